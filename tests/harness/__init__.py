"""End-to-end test harness: the real kopf operator loop against a fake kube-apiserver (kmock) over HTTP.

Modules (import them as ``tests.harness.<module>``):
- ``kube``: the fake apiserver (``FakeApiServer``), the ``Kube`` test API, resource declarations
  (``PODS``, ``SECRETS``, ``ENVIRONMENTS``, ``WORKERPOOLS``, ...), fault injection and holds;
- ``operator``: ``run_operator`` (kopf in-process, in its own thread and event loop, killable) and
  ``run_operator_process`` (the real ``environments-operator run`` subprocess), ``harness_settings``;
- ``kubelet``: moves pods through phases like a kubelet would (manual calls and an automatic mode);
- ``pruning``: what a real apiserver would prune from / reject in a stored custom object;
- ``recorder``: the per-test and session-wide record of requests in RBAC terms;
- ``apimachinery``: selectors, patch formats and validation rules the fake apiserver applies;
- ``incluster``: a tiny HTTPS in-cluster API (get and watch of one namespace's Secrets) for warm workers;
- ``plugin``: the pytest fixtures (``kube``, ``kubelet``) and hooks, loaded by ``tests/conftest.py``.
Also here, owned by others: ``emulator`` (the Environments API emulator for tests) and ``crd_validation``
(schema + CEL validation of custom objects; ``kube.install_crd`` uses its CEL part on every write).

What this package may not do: import or replace any part of the operator's own code paths.
"""
