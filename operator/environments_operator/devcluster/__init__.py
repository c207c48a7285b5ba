"""The simulated cluster: a fake kube-apiserver (kmock with the gaps a real apiserver would not have
filled), kubelets that move its pods through their lifecycle, and the HTTPS front through which pods
reach that apiserver with in-cluster configuration (tokens, RBAC), for ``environments-operator demo`` and
the test suite.

It needs the ``demo`` extra (``pip install 'environments-operator[demo]'``: kmock, jsonschema,
cel-python, trustme). The operator itself never imports this package (an import-linter contract holds that);
everything here is generic Kubernetes, and knows nothing of the operator's logic.
"""
