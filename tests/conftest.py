"""Registers the end-to-end harness fixtures (``kube``, ``kubelet``) and hooks; see tests/harness/."""

pytest_plugins = ["tests.harness.plugin"]
