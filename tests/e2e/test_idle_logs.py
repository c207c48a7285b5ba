"""An idle operator logs nothing per request: measured over a window, on the real ``environments-operator run``.

One WorkerPool keeps its long-poll open (about 67 polls a minute) and reads queue stats every 10 s; before
the request loggers were quieted that was about 72 INFO lines a minute per pool. kopf also logs each
success of the per-event bookkeeping handlers (the wake-ups on every WorkerPool, pod and Environment
event): one line per status write, hidden too.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
import yaml

from environments_operator.devcluster.kube import SECRETS, WORKERPOOLS, start_kube
from environments_operator.emulator.server import EmulatorServer
from tests.harness.emulator import API_KEY, self_hosted_environment
from tests.harness.operator import run_operator_process

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
WINDOW_SECONDS = 10.0


async def test_an_idle_pool_writes_no_log_line(tmp_path: Path) -> None:
    emulator = EmulatorServer(api_keys=[API_KEY])
    async with emulator, start_kube(tmp_path) as kube:
        for crd in ("environments", "workerpools"):
            kube.install_crd(yaml.safe_load((ROOT / "crds" / f"{crd}.managedagents.dev.yaml").read_text()))
        environment = self_hosted_environment(emulator, "idle")
        kube.ensure_namespace("ns")
        kube.create(SECRETS, {"metadata": {"name": "key", "namespace": "ns"},
                              "data": {"key": base64.b64encode(environment.key.encode()).decode()}}, "ns")
        kube.create(WORKERPOOLS, {"apiVersion": "managedagents.dev/v1alpha1", "kind": "WorkerPool",
                                  "metadata": {"name": "pool", "namespace": "ns"},
                                  "spec": {"environmentId": environment.id,
                                           "environmentKeySecretRef": {"name": "key", "key": "key"}}}, "ns")
        env = {"ANTHROPIC_BASE_URL": emulator.base_url, "ANTHROPIC_API_KEY": API_KEY,
               "ENVIRONMENTS_OPERATOR_METRICS_PORT": "0"}
        async with run_operator_process(kube, env=env) as operator:
            def ready() -> bool:
                pool = kube.get(WORKERPOOLS, "pool", "ns") or {}
                return any(c.get("type") == "Ready" and c.get("status") == "True"
                           for c in (pool.get("status") or {}).get("conditions") or [])

            await kube.wait_until(ready, timeout=30, message=lambda: operator.output[-2000:])
            await kube.wait_until(lambda: (kube.get(WORKERPOOLS, "pool", "ns") or {}).get("status", {}).get("queue"),
                                  timeout=30, message="the first queue stats in the status")
            await asyncio.sleep(1.0)  # start-up lines (kopf's, the first passes') are done
            before = len(operator.lines)
            await asyncio.sleep(WINDOW_SECONDS)
            idle_lines = operator.lines[before:]
    per_minute = len(idle_lines) * 60 / WINDOW_SECONDS
    assert idle_lines == [], f"{per_minute:.0f} lines/min while idle: {idle_lines[:5]}"
