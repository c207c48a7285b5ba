"""``environments-operator demo``: the whole system on one machine, with no cluster and no account.

It starts, all on loopback: the Environments API emulator, a **simulated** Kubernetes cluster (the fake
apiserver of ``environments_operator.devcluster`` and its process kubelet, which runs each worker pod as
a local process of the real ``environments-operator worker``), and the real operator as its own
``environments-operator run`` process. It then applies a self_hosted Environment, its key Secret and a
WorkerPool, creates a scripted agent, queues N sessions, and shows them being served: queued, claimed,
pod started, tools run, results posted, item stopped, pod cleaned up.

It exits 0 once every session is served and its pod is gone, with the last line
``demo: N/N sessions served (session start p50 …, max …)``; non-zero with the reason when something
fails. ``--keep-running`` stays up afterwards and prints how to reach the simulated cluster and the
emulator. Every process it started is ended when it stops, Ctrl-C included.

This module wires the parts together and reports; it needs the ``demo`` extra, imported only in ``main``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic

    from environments_operator.devcluster.kube import Kube
    from environments_operator.devcluster.process_kubelet import ProcessKubelet
    from environments_operator.emulator.server import EmulatorServer

NAMESPACE = "demo"
API_KEY = "sk-ant-demo-api-key"
# The image the simulated node "has": pods of this image run the local environments-operator.
WORKER_IMAGE = "environments-operator:demo"
AGENT_SCRIPT: list[dict[str, Any]] = [
    {"tool": "write", "input": {"file_path": "notes.md",
                                "content": "# Hello from a sandbox\n\nServed by a worker pod.\n"}},
    {"tool": "read", "input": {"file_path": "notes.md"}},
    {"tool": "grep", "input": {"pattern": "sandbox"}},
    {"tool": "bash", "input": {"command": "wc -l notes.md && echo \"pod $HOSTNAME\""}},
]
AGENT_REPLY = "The notes are written, read back and counted."
STARTUP_TIMEOUT_SECONDS = 60.0
# Per session on top of a fixed allowance: a worker's cold start is a second or two of CPU, and this
# machine may have two cores for N of them.
SERVE_TIMEOUT_SECONDS = 90.0
SERVE_TIMEOUT_PER_SESSION_SECONDS = 10.0
REFRESH_SECONDS = 0.2


class DemoFailed(Exception):
    """The demo could not serve its sessions; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=5, metavar="N", help="scripted sessions to serve (default 5)")
    parser.add_argument("--keep-running", action="store_true",
                        help="stay up once they are served, and print how to reach the simulated cluster")
    parser.add_argument("--max-workers", type=int, default=5, metavar="N",
                        help="the WorkerPool's maxWorkers (default 5)")
    parser.add_argument("--min-workers", type=int, default=0, metavar="N",
                        help="the WorkerPool's minWorkers: warm pods started before any session (default 0)")


# ----- what is shown ---------------------------------------------------------------------------------------


@dataclass
class SessionRow:
    """One session as the demo shows it."""

    session_id: str
    state: str = "queued"
    pod: str = ""
    phase: str = ""
    tools_done: int = 0
    first_result_after: float | None = None

    @property
    def done(self) -> bool:
        """Served, and its pod has finished and been cleaned up."""
        return self.state == "served" and self.phase == "deleted"

    def cells(self, tools_total: int) -> list[str]:
        first = f"{self.first_result_after:.2f} s" if self.first_result_after is not None else "-"
        return [self.session_id, self.state, self.pod or "-", self.phase or "-",
                f"{self.tools_done}/{tools_total}", first]


COLUMNS = ["SESSION", "STATE", "POD", "PHASE", "TOOLS", "FIRST RESULT"]


def render_table(rows: list[SessionRow], tools_total: int) -> list[str]:
    table = [COLUMNS, *(row.cells(tools_total) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            for line in table]


@dataclass
class Progress:
    """Shows the rows: redrawn in place on a terminal, else one plain line per change."""

    out: TextIO
    tools_total: int
    live: bool
    _drawn: int = 0
    _last: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def say(self, text: str) -> None:
        self._drawn = 0  # whatever is printed now stays; the table is drawn anew below it
        print(text, file=self.out, flush=True)

    def show(self, rows: list[SessionRow]) -> None:
        if self.live:
            lines = render_table(rows, self.tools_total)
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F")  # back to the table's first line
            for line in lines:
                self.out.write(f"\x1b[2K{line}\n")
            self.out.flush()
            self._drawn = len(lines)
            return
        for row in rows:
            cells = tuple(row.cells(self.tools_total))
            if self._last.get(row.session_id) != cells:
                self._last[row.session_id] = cells
                pod = f", pod {row.pod} {row.phase}" if row.pod else ""
                first = f", first result after {cells[5]}" if row.first_result_after is not None else ""
                print(f"demo: session {row.session_id}: {row.state}{pod}, tools {cells[4]}{first}",
                      file=self.out, flush=True)


# ----- the parts -------------------------------------------------------------------------------------------


@dataclass
class OperatorProcess:
    process: asyncio.subprocess.Process
    log_path: Path

    def check(self) -> None:
        """Raise ``DemoFailed`` if the operator has died, with the last lines it logged."""
        if self.process.returncode is not None:
            raise DemoFailed(f"the operator exited with code {self.process.returncode}; its last lines:\n"
                             f"{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@contextlib.asynccontextmanager
async def operator_process(kube: Kube, emulator: EmulatorServer, workdir: Path, *,
                           namespaces: Sequence[str] | None = (NAMESPACE,),
                           env: Mapping[str, str] | None = None) -> AsyncIterator[OperatorProcess]:
    """The real operator, ``environments-operator run``, against the simulated cluster and the emulator.

    It watches ``namespaces`` (None: all namespaces); ``env`` adds to its environment or overrides it
    (``ENVIRONMENTS_OPERATOR_*`` settings). Its output is appended to ``workdir/operator.log``.
    """
    scope = ["--all-namespaces"] if namespaces is None else [arg for ns in namespaces for arg in ("--namespace", ns)]
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "ENVIRONMENTS_OPERATOR_"))},
        "KUBECONFIG": str(kube.kubeconfig),
        "ANTHROPIC_API_KEY": API_KEY,
        "ANTHROPIC_BASE_URL": emulator.base_url,
        "ENVIRONMENTS_OPERATOR_WORKER_IMAGE": WORKER_IMAGE,
        "ENVIRONMENTS_OPERATOR_METRICS_PORT": "0",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log_path = workdir / "operator.log"
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "environments_operator", "run", *scope, "--standalone",
            env=full_env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)
    running = OperatorProcess(process, log_path)
    try:
        yield running
    finally:
        await end_process(process)


async def end_process(process: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM to the process group, SIGKILL if it is still there after ``grace`` seconds."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


def manifests(environment_key_secret: str, max_workers: int, min_workers: int = 0
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sample Environment and WorkerPool the demo applies."""
    environment = {
        "apiVersion": "managedagents.dev/v1alpha1", "kind": "Environment",
        "metadata": {"name": "sandboxes", "namespace": NAMESPACE},
        "spec": {"name": "Demo sandboxes", "config": {"type": "self_hosted"}},
    }
    pool = {
        "apiVersion": "managedagents.dev/v1alpha1", "kind": "WorkerPool",
        "metadata": {"name": "sandboxes", "namespace": NAMESPACE},
        "spec": {
            "environmentRef": {"name": "sandboxes"},
            "environmentKeySecretRef": {"name": environment_key_secret, "key": "environment-key"},
            "maxWorkers": max_workers,
            "minWorkers": min_workers,
            # Each session's pod ends as soon as its turn does, and is cleaned up soon after: the demo
            # shows the whole life of a pod.
            "maxIdleSeconds": 0,
            "ttlSecondsAfterFinished": 2,
            "startupTimeoutSeconds": 120,
        },
    }
    return environment, pool


# ----- the run ---------------------------------------------------------------------------------------------


async def wait_until(condition: Callable[[], Any], seconds: float, what: str,
                     check: Callable[[], None] | None = None) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        if check is not None:
            check()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {seconds:.0f} s waiting for {what}")
        await asyncio.sleep(REFRESH_SECONDS)


def observe(rows: list[SessionRow], kube: Kube, emulator: EmulatorServer, tools_total: int) -> None:
    """Fill every row from the emulator's sessions and work items and the simulated cluster's pods."""
    from environments_operator.devcluster.kube import PODS
    from environments_operator.domain.worker_manifests import ANNOTATION_SESSION_ID

    pods = {(p["metadata"].get("annotations") or {}).get(ANNOTATION_SESSION_ID): p
            for p in kube.list(PODS, NAMESPACE)}
    state = emulator.state
    for row in rows:
        session = state.sessions[row.session_id]
        results = [e for e in session.events if e["type"] == "user.tool_result"]
        row.tools_done = len(results)
        if results and row.first_result_after is None:
            # Both times are the emulator's, so a session found late (queued by hand) is timed right too.
            row.first_result_after = (datetime.fromisoformat(results[0]["processed_at"])
                                      - datetime.fromisoformat(session.created_at)).total_seconds()
        items = [item for item in state.work.values() if item.session_id == row.session_id]
        pod = pods.get(row.session_id)
        if pod is not None:
            row.pod = pod["metadata"]["name"]
            row.phase = (pod.get("status") or {}).get("phase", "")
        elif row.pod:
            row.phase = "deleted"
        stopped = bool(items) and all(item.state == "stopped" for item in items)
        if stopped and row.tools_done >= tools_total:
            row.state = "served"
        elif any(item.state in ("starting", "active") for item in items):
            row.state = "running"
        elif items and all(item.state == "queued" for item in items):
            row.state = "queued"


@dataclass
class SimulatedWorld:
    """Everything the demo runs, set up and serving: the sessions' side and the cluster's side."""

    kube: Kube
    emulator: EmulatorServer
    kubelet: ProcessKubelet
    operator: OperatorProcess
    api: AsyncAnthropic
    environment_id: str
    agent_id: str

    def check(self) -> None:
        """Raise ``DemoFailed`` if the operator has died."""
        self.operator.check()

    async def start_session(self) -> str:
        session = await self.api.beta.sessions.create(agent=self.agent_id, environment_id=self.environment_id)
        return session.id


@contextlib.asynccontextmanager
async def simulated_world(workdir: Path, *, max_workers: int, min_workers: int = 0,
                          say: Callable[[str], None] = lambda _: None) -> AsyncIterator[SimulatedWorld]:
    """The emulator, the simulated cluster with its process kubelet, the operator process, and the sample
    Environment, key Secret, WorkerPool and scripted agent, all applied and ready."""
    from anthropic import AsyncAnthropic

    from environments_operator.devcluster.kube import ENVIRONMENTS, PODS, SECRETS, WORKERPOOLS, start_kube
    from environments_operator.devcluster.process_kubelet import ProcessKubelet
    from environments_operator.domain.crd import all_crds
    from environments_operator.domain.worker_manifests import ANNOTATION_WORK_ID, LABEL_WARM
    from environments_operator.emulator.server import EmulatorServer

    async with EmulatorServer(api_keys=[API_KEY]) as emulator, start_kube(workdir) as kube:
        say(f"demo: Environments API emulator at {emulator.base_url}; simulated apiserver at {kube.url}")
        for crd in all_crds().values():
            kube.install_crd(crd)
        kube.ensure_namespace(NAMESPACE)
        kubelet = ProcessKubelet(kube, images={WORKER_IMAGE}, root=workdir / "node")
        kubelet.start()
        try:
            async with operator_process(kube, emulator, workdir) as operator, \
                    AsyncAnthropic(api_key=API_KEY, base_url=emulator.base_url) as api:
                say("demo: operator started (environments-operator run); applying a self_hosted "
                    "Environment, its key Secret and a WorkerPool")
                environment, pool = manifests("sandboxes-environment-key", max_workers, min_workers)
                kube.create(ENVIRONMENTS, environment, NAMESPACE)
                environment_id = await wait_until(
                    lambda: ((kube.get(ENVIRONMENTS, "sandboxes", NAMESPACE) or {}).get("status") or {}).get("id"),
                    STARTUP_TIMEOUT_SECONDS, "the Environment to be created through the API", operator.check)
                issued = await api.post(f"/_emulator/environments/{environment_id}/environment-key",
                                        cast_to=object, body={})
                assert isinstance(issued, dict)
                key = issued["environment_key"]
                kube.create(SECRETS, {"metadata": {"name": "sandboxes-environment-key", "namespace": NAMESPACE},
                                      "data": {"environment-key": base64.b64encode(key.encode()).decode()}},
                            NAMESPACE)
                kube.create(WORKERPOOLS, pool, NAMESPACE)
                if min_workers:
                    # Ready means more than Running: the worker has imported the SDK and watches its
                    # assignment (its ServiceAccount, named after the pod, opened a watch through the front).
                    def warm_and_watching() -> bool:
                        watching = {user.rsplit(":", 1)[-1] for user, call in kube.server.incluster_calls
                                    if call.verb == "watch"}
                        return len([p for p in kube.list(PODS, NAMESPACE, {LABEL_WARM: "true"})
                                    if p["metadata"]["name"] in watching
                                    and not (p["metadata"].get("annotations") or {}).get(ANNOTATION_WORK_ID)
                                    ]) >= min_workers

                    await wait_until(warm_and_watching, STARTUP_TIMEOUT_SECONDS, f"{min_workers} warm worker pods",
                                     operator.check)
                    say(f"demo: {min_workers} warm worker pods running before any session (minWorkers), each "
                        "waiting for its assignment; each serves one session")
                agent = await api.post("/_emulator/agents", cast_to=object,
                                       body={"name": "demo-agent", "script": AGENT_SCRIPT, "reply": AGENT_REPLY})
                assert isinstance(agent, dict)
                yield SimulatedWorld(kube, emulator, kubelet, operator, api, environment_id, agent["id"])
        finally:
            await kubelet.stop()


async def run_demo(args: argparse.Namespace, out: TextIO) -> int:
    progress = Progress(out, len(AGENT_SCRIPT), live=out.isatty())
    workdir = Path(tempfile.mkdtemp(prefix="environments-operator-demo-"))
    progress.say("demo: the Kubernetes cluster here is SIMULATED: a fake apiserver on loopback, and a kubelet\n"
                 "      that runs each worker pod as a local process of the real `environments-operator worker`.")
    try:
        async with simulated_world(workdir, max_workers=args.max_workers, min_workers=args.min_workers,
                                   say=progress.say) as world:
            progress.say(f"demo: Environment {world.environment_id} ready; queueing {args.sessions} sessions of a "
                         f"scripted agent ({', '.join(step['tool'] for step in AGENT_SCRIPT)})")
            rows: list[SessionRow] = []
            for _ in range(args.sessions):
                rows.append(SessionRow(await world.start_session()))

            def all_served() -> bool:
                observe(rows, world.kube, world.emulator, len(AGENT_SCRIPT))
                progress.show(rows)
                return all(row.done for row in rows)

            timeout = SERVE_TIMEOUT_SECONDS + SERVE_TIMEOUT_PER_SESSION_SECONDS * args.sessions
            await wait_until(all_served, timeout, "every session to be served", world.check)
            starts = [row.first_result_after for row in rows if row.first_result_after is not None]
            failed_pods = {name: code for name, code in world.kubelet.exit_codes.items() if code != 0}
            if failed_pods:
                raise DemoFailed(f"worker pods exited non-zero: {failed_pods}")
            progress.say(f"demo: {len(rows)}/{args.sessions} sessions served (session start p50 "
                         f"{statistics.median(starts):.2f} s, max {max(starts):.2f} s)")
            if args.keep_running:
                await keep_running(progress, world, rows)
        return 0
    except DemoFailed as failure:
        progress.say(f"demo: failed: {failure}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def keep_running(progress: Progress, world: SimulatedWorld, rows: list[SessionRow]) -> None:
    """Stay up, and show every session of the environment as it runs, including those queued by hand."""
    base_url = world.emulator.base_url
    progress.say(
        "demo: still running (Ctrl-C ends it and every process it started).\n"
        f"  simulated cluster:  export KUBECONFIG={world.kube.kubeconfig}\n"
        f"                      kubectl get environments,workerpools,pods -n {NAMESPACE}\n"
        f"  emulator:           {base_url} (API key {API_KEY})\n"
        f"  queue a session:    curl -s -X POST {base_url}/v1/sessions -H 'x-api-key: {API_KEY}' "
        f"-H 'content-type: application/json' "
        f"-d '{{\"agent\": \"{world.agent_id}\", \"environment_id\": \"{world.environment_id}\"}}'")
    known = {row.session_id for row in rows}
    while True:
        world.check()
        for session_id, session in world.emulator.state.sessions.items():
            if session_id not in known and session.environment_id == world.environment_id:
                known.add(session_id)
                rows.append(SessionRow(session_id))
        observe(rows, world.kube, world.emulator, len(AGENT_SCRIPT))
        progress.show(rows)
        await asyncio.sleep(1.0)


def main(args: argparse.Namespace) -> int:
    if args.sessions < 1 or args.max_workers < 1:
        print("environments-operator demo: --sessions and --max-workers must be at least 1", file=sys.stderr)
        return 2
    if not 0 <= args.min_workers <= args.max_workers:
        print("environments-operator demo: --min-workers must be between 0 and --max-workers", file=sys.stderr)
        return 2
    try:
        import kmock  # noqa: F401
    except ImportError:
        print("environments-operator demo: the simulated cluster needs the demo extra: "
              "pip install 'environments-operator[demo]'", file=sys.stderr)
        return 2

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        # SIGTERM ends the demo like Ctrl-C: through the cleanup of every part it started.
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await run_demo(args, sys.stdout)
        except asyncio.CancelledError:
            print("demo: stopped", file=sys.stdout, flush=True)
            return 130

    try:
        return asyncio.run(guarded())
    except KeyboardInterrupt:
        print("demo: stopped", flush=True)
        return 130
