"""The release notes (NOTES.txt, rendered by Helm itself): what to apply next, inline, for the namespaces
actually served, as manifests the CRDs admit and shell a user can paste as it is."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from environments_operator.devcluster.crd_validation import validate
from environments_operator.domain.environment import EnvironmentSpec
from environments_operator.domain.workerpool import WorkerPoolSpec
from tests.chart.rendering import FULLNAME, JSON, RELEASE_NAMESPACE, SCENARIOS, WATCHED, chart, render_files

NOTES = "environments-operator/templates/NOTES.txt"
CRDS = {doc["spec"]["names"]["kind"]: doc for doc in (yaml.safe_load(crd["data"]) for crd in chart().crds)
        if doc["spec"]["group"] == "managedagents.dev"}
MODELS: dict[str, Any] = {"Environment": EnvironmentSpec, "WorkerPool": WorkerPoolSpec}
HEREDOC = re.compile(r"^kubectl apply -f - <<'EOF'\n(.*?)^EOF\n", re.MULTILINE | re.DOTALL)

# scenario -> (the namespace the manifests use, whether the operator has a default API key)
CASES: dict[str, tuple[str, bool]] = {
    "default": (RELEASE_NAMESPACE, False),
    "namespaced": (WATCHED[0], False),
    "emulator": (RELEASE_NAMESPACE, True),
    "existing-secret": (RELEASE_NAMESPACE, True),
    "api-key-value": (RELEASE_NAMESPACE, True),
    "one-namespace": ("team-c", False),
}
VALUES: dict[str, JSON] = {**SCENARIOS, "one-namespace": {"watchNamespaces": ["team-c"]}}


def _notes(scenario: str) -> str:
    return render_files(VALUES[scenario])[NOTES]


def _manifests(notes: str) -> list[JSON]:
    return [yaml.safe_load(block) for block in HEREDOC.findall(notes)]


def _admission_errors(obj: JSON) -> list[str]:
    """What the apiserver (with the chart's CRDs) and then the operator's model would refuse."""
    errors = [str(error) for error in validate(CRDS[obj["kind"]], obj)]
    if not errors:
        try:
            MODELS[obj["kind"]].model_validate(obj["spec"])
        except ValueError as error:
            errors.append(str(error))
    return errors


@pytest.mark.parametrize("scenario", CASES)
def test_notes_show_a_working_environment_and_workerpool(scenario: str) -> None:
    namespace, default_key = CASES[scenario]
    notes = _notes(scenario)
    environment, pool = _manifests(notes)
    assert (environment["kind"], pool["kind"]) == ("Environment", "WorkerPool")
    for obj in (environment, pool):
        assert obj["apiVersion"] == "managedagents.dev/v1alpha1"
        assert obj["metadata"]["namespace"] == namespace
        assert _admission_errors(obj) == [], obj["kind"]
    assert environment["spec"]["config"]["type"] == "self_hosted"
    assert pool["spec"]["environmentRef"] == {"name": environment["metadata"]["name"]}
    # Each Secret a manifest names is created by a command of the notes, in the same namespace.
    refs = [pool["spec"]["environmentKeySecretRef"]]
    if default_key:
        assert "apiKeySecretRef" not in environment["spec"]  # the operator's key is enough
    else:
        refs.append(environment["spec"]["apiKeySecretRef"])
    for ref in refs:
        assert f"kubectl -n {namespace} create secret generic {ref['name']} --from-literal={ref['key']}=<" in notes
    assert "crds/examples" not in notes  # nothing from a source checkout is needed


def test_notes_name_the_other_served_namespaces() -> None:
    notes = _notes("namespaced")
    assert f"use namespace {WATCHED[0]}" in notes
    assert f"to use another ({', '.join(WATCHED[1:])})" in notes
    assert "any other works too" in _notes("default")
    assert "to use another" not in _notes("one-namespace")


def test_notes_with_the_emulator_issue_the_environment_key() -> None:
    notes = _notes("emulator")
    assert f"port-forward service/{FULLNAME}-emulator 8765:8765" in notes
    assert ("/_emulator/environments/$(kubectl -n operators get environment sandboxes -o jsonpath='{.status.id}')"
            "/environment-key") in notes
    assert "x-api-key: emulator-placeholder-key" in notes
    assert "_emulator" not in _notes("default")


def test_the_manifests_survive_being_pasted_into_a_shell(tmp_path: Path) -> None:
    """Each heredoc, run by bash with a stand-in kubectl, hands exactly the manifest above to `kubectl apply`."""
    notes = _notes("namespaced")
    script = "\n".join(match.group(0) for match in HEREDOC.finditer(notes))
    stub = f'n=0\nkubectl() {{ n=$((n+1)); cat > "{tmp_path}/applied-$n.yaml"; }}\n'
    subprocess.run(["bash", "-euc", stub + script], check=True)
    applied = [yaml.safe_load((tmp_path / f"applied-{n}.yaml").read_text()) for n in (1, 2)]
    assert applied == _manifests(notes)


def test_the_admission_check_catches_a_broken_manifest() -> None:
    """Guards the first test: a manifest the CRD or the model refuses is reported."""
    _, pool = _manifests(_notes("default"))
    broken = {**pool, "spec": {k: v for k, v in pool["spec"].items() if k != "environmentKeySecretRef"}}
    assert _admission_errors(broken)
    both = {**pool, "spec": {**pool["spec"], "environmentId": "env_abc"}}
    assert _admission_errors(both)  # CEL: exactly one of environmentRef and environmentId
