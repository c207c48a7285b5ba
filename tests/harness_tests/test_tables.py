"""Server-side printing: the Table ``kubectl get`` asks the fake apiserver for."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from environments_operator.devcluster.kube import PODS, SECRETS, WORKERPOOLS, Kube
from environments_operator.devcluster.tables import as_table, human_duration, json_path
from environments_operator.domain.crd import workerpool_crd

KUBECTL_ACCEPT = ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,"
                  "application/json")
NS = "ns"


@pytest.mark.parametrize(("path", "expected"), [
    (".metadata.name", "p"),
    (".status.conditions[?(@.type==\"Ready\")].status", "True"),
    (".status.conditions[?(@.type==\"Other\")].status", None),
    (".status.conditions[1].type", "Synced"),
    ("{.spec.maxWorkers}", 3),
    (".spec.absent.deeper", None),
])
def test_json_path_subset(path: str, expected: Any) -> None:
    obj = {"metadata": {"name": "p"}, "spec": {"maxWorkers": 3},
           "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Synced", "status": "False"}]}}
    assert json_path(obj, path) == expected


@pytest.mark.parametrize(("seconds", "shown"), [
    (5, "5s"), (119, "119s"), (125, "2m5s"), (600, "10m"), (3 * 3600 + 60, "3h1m"), (9 * 3600, "9h"),
    (3 * 86400 + 3600, "3d1h"), (30 * 86400, "30d"), (800 * 86400, "2y"),
])
def test_ages_read_as_kubectl_users_know_them(seconds: int, shown: str) -> None:
    assert human_duration(seconds) == shown


def test_a_custom_resource_table_has_the_crds_printer_columns() -> None:
    crd = workerpool_crd()
    created = datetime(2026, 1, 1, tzinfo=UTC)
    pool = {"metadata": {"name": "pool", "creationTimestamp": created.isoformat().replace("+00:00", "Z")},
            "spec": {"maxWorkers": 3}, "status": {"environmentId": "env_1"}}
    table = as_table("WorkerPool", [pool], crd=crd, version="v1alpha1", now=created + timedelta(seconds=42))
    names = [column["name"] for column in table["columnDefinitions"]]
    printer = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    assert names == ["Name", *(column["name"] for column in printer)]
    (row,) = table["rows"]
    assert row["cells"][0] == "pool" and "env_1" in row["cells"] and row["cells"][-1] == "42s"


async def test_kubectls_accept_header_gets_a_table_and_plain_json_does_not(kube: Kube) -> None:
    kube.ensure_namespace(NS)
    kube.create(PODS, {"metadata": {"name": "p", "namespace": NS}, "spec": {"containers": [{"name": "c"}]}}, NS)
    async with aiohttp.ClientSession() as session:
        async with session.get(kube.url + PODS.path(NS), headers={"Accept": KUBECTL_ACCEPT}) as response:
            table = await response.json()
        async with session.get(kube.url + PODS.path(NS)) as response:
            plain = await response.json()
    assert table["kind"] == "Table" and [c["name"] for c in table["columnDefinitions"]] == [
        "Name", "Ready", "Status", "Restarts", "Age"]
    assert table["rows"][0]["cells"][:3] == ["p", "0/1", "Pending"]
    assert plain["kind"] == "PodList"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
async def test_kubectl_get_prints_the_printer_columns(kube: Kube) -> None:
    kube.install_crd(workerpool_crd())
    kube.ensure_namespace(NS)
    kube.create(SECRETS, {"metadata": {"name": "s", "namespace": NS}, "data": {"k": "dg=="}}, NS)
    kube.create(WORKERPOOLS, {"apiVersion": "managedagents.dev/v1alpha1", "kind": "WorkerPool",
                              "metadata": {"name": "pool", "namespace": NS},
                              "spec": {"environmentId": "env_1", "environmentKeySecretRef": {"name": "s", "key": "k"}}},
                NS)
    result = await asyncio.to_thread(
        subprocess.run, ["kubectl", "--kubeconfig", str(kube.kubeconfig), "get", "workerpools,secrets", "-n", NS],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header[0] == "NAME" and "READY" in header and len(header) > 2
    assert any(line.split()[:3] == ["secret/s", "Opaque", "1"] for line in result.stdout.splitlines())
