"""Benchmark: the WorkerPool soak, long: thousands of items through the operator under every fault at once.

The driver, the fault mix and the exact definitions of lost / served twice / hanging are in
``tests/harness/soak.py``; ``tests/e2e/test_workerpool_soak.py`` is the short version in the suite. This
script builds the same world as the suite's ``workerpool_world`` fixture (the fake apiserver with both
CRDs, the emulator with one self_hosted environment, the key in a Secret) and runs the soak on it, with
the harness records pruned as it goes (so that memory is the system's, not the test record's).

The operator runs either as its own process (``--operator process``, the default: the real
``environments-operator run``, killed with SIGKILL, so its RSS is its own) or in a thread of this process
(``--operator thread``: the suite's ``OperatorRunner``; RSS is then this whole process's, fake apiserver
and emulator included). Crashes stop after ``--kills-until`` of the enqueue phase, so that the last
operator process serves the rest: its RSS shortly after it started and at the end is the flatness figure.

    PYTHONPATH=operator:. .venv/bin/python tests/bench/bench_soak.py --items 10000 --seed 7 \\
        [--rate 10] [--max-workers 60] [--operator process|thread] [--kills-until 0.5] [--no-faults]

Prints progress every 10 s, then the figures; exits 1 if an invariant failed (and prints the evidence).
A script, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "operator"))

from tests.harness.emulator import API_KEY, self_hosted_environment  # noqa: E402
from tests.harness.soak import FaultMix, SoakConfig, SoakResult, rss_of_pid, run_soak  # noqa: E402

from environments_operator.devcluster.kube import (  # noqa: E402
    PODS,
    SECRETS,
    WORKERPOOLS,
    Kube,
    start_kube,
)
from environments_operator.devcluster.kubelet import Kubelet  # noqa: E402
from environments_operator.emulator.server import EmulatorServer  # noqa: E402

NAMESPACE = "ns"
KEY_SECRET = "env-key"
WORKER_IMAGE = "registry.example/worker:soak"


@dataclasses.dataclass
class _Line:
    """An operator output line, shaped like the log records ``log_lines_about`` reads."""

    text: str
    created: float
    levelno: int = logging.INFO
    levelname: str = "LOG"
    name: str = "operator"
    msecs: float = 0.0

    def getMessage(self) -> str:
        return self.text


class ProcessOperator:
    """``environments-operator run`` as a process: ``kill()`` is SIGKILL, ``start()`` a fresh process."""

    def __init__(self, kube: Kube, env: dict[str, str], keep_lines: int = 200_000) -> None:
        self.kube = kube
        self.env = env
        self.starts = 0
        self.process: asyncio.subprocess.Process | None = None
        self.logs: collections.deque[_Line] = collections.deque(maxlen=keep_lines)
        self.lives: list[dict[str, Any]] = []  # per process: pid, started, rss after start, rss at its end
        self._collector: asyncio.Task[None] | None = None
        self._killed = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None and not self._killed

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss(self) -> int:
        try:
            return rss_of_pid(self.pid) if self.running else 0
        except OSError:
            return 0

    async def start(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.kill()
        if self.process is not None:
            await self.process.wait()
        since = len(self.kube.calls)
        self._killed = False
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "environments_operator", "run", "--namespace", NAMESPACE, "--standalone",
            env={**os.environ, **self.env, "KUBECONFIG": str(self.kube.kubeconfig), "PYTHONUNBUFFERED": "1"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        self.starts += 1
        self.lives.append({"pid": self.process.pid, "started": time.monotonic()})
        self._collector = asyncio.create_task(self._collect(self.process))
        expected = {(WORKERPOOLS.group, WORKERPOOLS.plural, NAMESPACE), ("", PODS.plural, NAMESPACE)}

        def watching() -> bool:
            if self.process is None or self.process.returncode is not None:
                raise RuntimeError("the operator process exited during startup:\n"
                                   + "\n".join(line.text for line in list(self.logs)[-40:]))
            nonlocal since
            calls = self.kube.calls
            since = 0 if len(calls) < since else since  # the soak pruned the record meanwhile
            seen = {(c.group, c.resource, c.namespace) for c in calls[since:] if c.verb == "watch"}
            return expected <= seen

        await self.kube.wait_until(watching, timeout=60, message="the operator process watching")

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            if self.lives:
                self.lives[-1]["rss_end"] = self.rss()
            self._killed = True
            self.process.kill()

    async def _collect(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            text = raw.decode(errors="replace").rstrip()
            level = logging.WARNING if ("WARNING" in text or "ERROR" in text) else logging.INFO
            self.logs.append(_Line(text, time.time(), levelno=level))

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            if self.lives:
                self.lives[-1]["rss_end"] = self.rss()
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._collector is not None:
            self._collector.cancel()


async def sample_rss_after_start(operator: ProcessOperator, delay: float) -> None:
    """Record each process's RSS ``delay`` seconds after it started (its warmed-up baseline)."""
    seen: set[int] = set()
    while True:
        await asyncio.sleep(1.0)
        if operator.running and operator.lives and operator.pid not in seen:
            life = operator.lives[-1]
            if time.monotonic() - life["started"] >= delay:
                life["rss_start"] = operator.rss()
                seen.add(operator.pid)


@contextlib.asynccontextmanager
async def soak_world(workdir: Path, mode: str, relist_seconds: int) -> AsyncIterator[Any]:
    """The suite's ``workerpool_world``, outside pytest (see tests/e2e/conftest.py)."""
    import kopf
    from tests.e2e.conftest import ENVIRONMENTS_CRD, WORKERPOOLS_CRD, WorkerPoolWorld, record_requests
    from tests.harness.operator import run_operator

    import environments_operator.handlers  # noqa: F401  (registers the handlers)
    from environments_operator.handlers.startup import apply_kopf_settings

    async with start_kube(workdir) as kube:
        kube.install_crd(ENVIRONMENTS_CRD)
        kube.install_crd(WORKERPOOLS_CRD)
        emulator = EmulatorServer(api_keys=[API_KEY])
        responses = record_requests(emulator)
        async with emulator:
            environment = self_hosted_environment(emulator, "workers")
            kube.ensure_namespace(NAMESPACE)
            kube.create(SECRETS, {"metadata": {"name": KEY_SECRET, "namespace": NAMESPACE},
                                  "data": {"key": base64.b64encode(environment.key.encode()).decode()}}, NAMESPACE)
            env = {"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": emulator.base_url,
                   "ENVIRONMENTS_OPERATOR_WORKER_IMAGE": WORKER_IMAGE,
                   "ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS": "3600",
                   "ENVIRONMENTS_OPERATOR_METRICS_PORT": "0",
                   "ENVIRONMENTS_OPERATOR_POD_RELIST_SECONDS": str(relist_seconds)}
            kubelet = Kubelet(kube)
            if mode == "process":
                operator = ProcessOperator(kube, env)
                await operator.start()
                try:
                    yield WorkerPoolWorld(kube, kubelet, emulator, operator, environment, responses)  # type: ignore[arg-type]
                finally:
                    await operator.stop()
            else:
                os.environ.update(env)
                os.environ["KUBECONFIG"] = str(kube.kubeconfig)
                async with run_operator(kube, registry=kopf.get_default_registry(), namespaces=[NAMESPACE],
                                        settings_hook=apply_kopf_settings, log_level=logging.INFO) as runner:
                    yield WorkerPoolWorld(kube, kubelet, emulator, runner, environment, responses)


def report(args: argparse.Namespace, result: SoakResult, operator: Any) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    mib = 2**20
    rows = [
        ("items", f"{result.config.items} (seed {result.config.seed}, enqueued over "
                  f"{result.config.enqueue_seconds:.0f} s, maxWorkers {result.config.max_workers})"),
        ("items lost", str(len(result.lost))),
        ("items served twice", str(len(result.served_twice))),
        ("items left hanging at the end", str(len(result.hanging))),
        ("served by a worker / stopped after a fault of their pod",
         f"{result.served} / {result.stopped_after_fault}"),
        ("served again by a fresh pod after its lease ran out (lease lost)", str(len(result.redelivered))),
        ("dispatch latency, enqueue -> acked", f"p50 {ms(result.dispatch_p50)}, p99 {ms(result.dispatch_p99)}"),
        ("dispatch latency of the items enqueued after the last crash could happen",
         latency_after(result, args.kills_until)),
        ("time to drain (injection over -> every item stopped)",
         "-" if result.drain_seconds is None else f"{result.drain_seconds:.1f} s"),
        ("total", f"{result.total_seconds:.0f} s"),
        ("operator starts (crashes + 1)", str(result.operator_starts)),
        ("pod fates", ", ".join(f"{k} {v}" for k, v in sorted(result.fates.items()))),
        ("fault episodes", ", ".join(f"{k} {v}" for k, v in sorted(result.episodes.items()))),
        ("API fault rules fired", str(sum(result.api_faults_fired.values())) + " ("
         + ", ".join(f"{k} {v}" for k, v in sorted(result.api_faults_fired.items()) if v) + ")"),
    ]
    if isinstance(operator, ProcessOperator):
        lives = [life for life in operator.lives if "rss_start" in life and "rss_end" in life]
        last = operator.lives[-1] if operator.lives else {}
        rows.append(("operator RSS, first process: 10 s after start -> at its kill",
                     f"{operator.lives[0].get('rss_start', 0) / mib:.0f} -> "
                     f"{operator.lives[0].get('rss_end', 0) / mib:.0f} MiB" if operator.lives else "-"))
        rows.append(("operator RSS, last process (no crash after it started): 10 s after start -> end",
                     f"{last.get('rss_start', 0) / mib:.0f} -> {last.get('rss_end', 0) / mib:.0f} MiB, "
                     f"lived {time.monotonic() - last.get('started', time.monotonic()):.0f} s"))
        rows.append(("operator RSS of every process (start -> end, MiB)",
                     " ".join(f"{life['rss_start'] / mib:.0f}->{life['rss_end'] / mib:.0f}" for life in lives)))
    else:
        rows.append((f"RSS of {result.config.rss_label}", f"start {result.rss_start / mib:.0f} MiB, "
                     f"end {result.rss_end / mib:.0f} MiB"))
    rows.append(("RSS samples (s: MiB)", " ".join(f"{at:.0f}:{rss / mib:.0f}" for at, rss in result.rss_samples)))
    print("\n| figure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if result.anomalies:
        print(f"\nanomalies ({len(result.anomalies)}): {result.anomalies[:20]}")


def latency_after(result: SoakResult, kills_until: float) -> str:
    """p50/p99 of the items enqueued once crashes had stopped (plus a minute for a restart's backlog)."""
    from tests.harness.soak import percentile

    since = kills_until * result.config.enqueue_seconds + 60.0
    values = [latency for enqueued, latency in result.latencies if enqueued >= since]
    if not values:
        return "-"
    p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
    assert p50 is not None and p99 is not None
    return f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (n={len(values)}, enqueued after {since:.0f} s)"


async def run(args: argparse.Namespace) -> int:
    from tests.harness.soak import log_lines_about

    # SIGTERM ends the run like Ctrl-C: the operator process is stopped on the way out.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)

    mix = FaultMix.none() if args.no_faults else FaultMix(
        kill_every=(args.kill_every[0], args.kill_every[1]), kills_until=args.kills_until,
        unnoticed_vanish=args.unnoticed_vanish, notice_seconds=args.notice_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        async with soak_world(Path(tmp), args.operator, args.relist_seconds) as world:
            operator = world.operator
            sampler = asyncio.create_task(sample_rss_after_start(operator, 10.0)) \
                if isinstance(operator, ProcessOperator) else None
            config = SoakConfig(
                items=args.items, seed=args.seed, enqueue_seconds=args.items / args.rate,
                max_workers=args.max_workers, drain_timeout=args.drain_timeout, faults=mix, prune_records=True,
                ttl_seconds_after_finished=args.ttl,
                rss_of=operator.rss if isinstance(operator, ProcessOperator) else None,
                rss_label="the operator process" if isinstance(operator, ProcessOperator)
                else "this process (the operator runs in a thread of it)",
                progress=lambda text: print(text, flush=True))
            print(f"soak: {args.items} items, seed {args.seed}, operator {args.operator}; faults: "
                  f"{mix.describe()}", flush=True)
            result = await run_soak(world, config)
            if isinstance(operator, ProcessOperator) and operator.lives:
                operator.lives[-1]["rss_end"] = operator.rss()
            if sampler is not None:
                sampler.cancel()
            report(args, result, operator)
            if args.dump_log:
                args.dump_log.write_text("\n".join(
                    f"{time.strftime('%H:%M:%S', time.localtime(line.created))} {line.getMessage()}"
                    for line in operator.logs) + "\n\nevents:\n" + "\n".join(text for _, text in result.events))
            if not result.ok or result.drain_seconds is None or result.anomalies:
                bad = result.lost + result.served_twice + result.hanging
                print("\nFAILED:\n" + result.summary())
                print("events:\n" + "\n".join(f"  {at:9.2f} {text}" for at, text in result.events))
                print("operator log lines about the first of them:")
                print("\n".join(log_lines_about(list(operator.logs), bad[:3], limit=80)))
                return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, default=10.0, help="items enqueued per second")
    parser.add_argument("--max-workers", type=int, default=60)
    parser.add_argument("--operator", choices=("process", "thread"), default="process")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(20.0, 60.0), metavar=("MIN", "MAX"))
    parser.add_argument("--kills-until", type=float, default=0.5,
                        help="crashes only in this first share of the enqueue phase")
    parser.add_argument("--relist-seconds", type=int, default=10)
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--ttl", type=int, default=30, help="the pool's ttlSecondsAfterFinished")
    parser.add_argument("--notice-seconds", type=float, default=10.0,
                        help="a pod vanishes only once it and the operator's watch are this old")
    parser.add_argument("--unnoticed-vanish", action="store_true",
                        help="let pods vanish where the operator can miss it (a known defect: items are lost)")
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--dump-log", type=Path, help="write the operator's output lines here at the end")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
