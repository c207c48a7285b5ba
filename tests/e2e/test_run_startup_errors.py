"""``environments-operator run`` when the cluster is not usable: one clear line and a non-zero exit within seconds.

Each case runs the real command as a process, as a user would, against a missing kubeconfig, a closed
port, and the fake apiserver without our CRDs. None may print a traceback or retry.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from environments_operator.devcluster.kube import DEFAULT_RESOURCES, ENVIRONMENTS, WORKERPOOLS, start_kube

# Well within "seconds" even on a loaded CI machine; a retry loop would take minutes.
DEADLINE_SECONDS = 20.0


async def run_command(env: dict[str, str]) -> tuple[int, str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "KUBECONFIG"))}
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "environments_operator", "run", env={**clean, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), DEADLINE_SECONDS)
    assert process.returncode is not None
    return process.returncode, (stdout + stderr).decode(), time.monotonic() - started


def assert_one_line(output: str, *fragments: str) -> None:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in output, output
    assert lines[0].startswith("environments-operator run: "), output
    for fragment in fragments:
        assert fragment in lines[0], output


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "{server}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: c, context: {{cluster: c, user: u}}}}]
current-context: c
""")
    return path


async def test_no_usable_kubeconfig(tmp_path: Path) -> None:
    code, output, _ = await run_command({"KUBECONFIG": str(tmp_path / "missing"), "HOME": str(tmp_path)})
    assert code == 3
    assert_one_line(output, "no usable Kubernetes configuration", "set KUBECONFIG")


async def test_unreachable_api_server(tmp_path: Path) -> None:
    code, output, _ = await run_command({"KUBECONFIG": str(kubeconfig(tmp_path / "kc", "http://127.0.0.1:1"))})
    assert code == 4
    assert_one_line(output, "cannot reach the Kubernetes API server at http://127.0.0.1:1", "Connection refused")


@pytest.mark.parametrize(("declared", "says"), [
    ((), "serves no managedagents.dev/v1alpha1: the CRDs are not installed"),
    ((ENVIRONMENTS,), "without workerpools"),
], ids=["no-crds", "one-crd"])
async def test_crds_not_installed(tmp_path: Path, declared: tuple[object, ...], says: str) -> None:
    resources = [r for r in DEFAULT_RESOURCES if r not in (ENVIRONMENTS, WORKERPOOLS)] + list(declared)
    async with start_kube(tmp_path, resources=resources) as kube:  # type: ignore[arg-type]
        code, output, _ = await run_command({"KUBECONFIG": str(kube.kubeconfig)})
    assert code == 5
    assert_one_line(output, says, "kubectl apply -f crds/")


async def test_log_format_json_writes_one_json_object_per_line(tmp_path: Path) -> None:
    import json

    from tests.harness.operator import run_operator_process

    async with start_kube(tmp_path) as kube, run_operator_process(
            kube, args=("run", "--all-namespaces", "--standalone", "--log-format", "json")) as operator:
        await asyncio.sleep(0.5)
        lines = [line for line in operator.output.splitlines() if line.strip()]
    assert lines, "the operator logged nothing"
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(record, dict) and "message" in record for record in records), records[:3]
