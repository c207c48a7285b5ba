"""The process kubelet: runs the simulated cluster's worker pods as local processes of the real worker.

For each pod that appears in the fake apiserver it does what a node's kubelet would, as far as a worker
can tell from inside its pod:

- a pod with ``spec.schedulingGates`` stays Pending (``PodScheduled=False``, reason ``SchedulingGated``)
  until the gates are removed;
- a container whose image it can run (the operator's worker image, given at start) and whose
  ``command``/``args`` start ``environments-operator`` is started as this Python's
  ``-m environments_operator ...``; any other image stays Pending with the container waiting in
  ``ErrImageNeverPull``, as an image a node cannot pull would (so a pool's startup timeout shows too);
- the process gets only the container's env: ``value``, ``secretKeyRef`` read from the fake apiserver's
  Secrets, ``fieldRef`` for ``metadata.name``/``metadata.namespace``/``spec.nodeName``/``status.podIP``,
  plus ``HOSTNAME`` (the pod's name) and ``PATH``; a fresh working directory, which is also its HOME and
  TMPDIR, per pod; a missing Secret or key keeps the container waiting in ``CreateContainerConfigError``;
- phases ``Pending`` → ``Running`` → ``Succeeded``/``Failed``, with container statuses and exit codes
  (a process killed by signal N exits ``128+N``, as a container runtime reports it);
- when the pod is deleted, SIGTERM to the process group, then SIGKILL after the deletion's grace period
  (``deletionGracePeriodSeconds``, else the pod's ``terminationGracePeriodSeconds``, default 30);
- with ``kube.graceful_pod_deletion``, a Terminating pod is removed (a delete with grace 0, as a kubelet
  sends) once its process has exited, or at once if it has none; ``lose(name)`` declares that pod's node
  lost: its process is still killed on deletion, but no status is written after it exits and the pod
  stays Terminating (until a test force-deletes it).

Not emulated: volume mounts, init and sidecar containers (only the worker container runs), resource
limits, probes, restarts (worker pods are ``restartPolicy: Never``). ``stop()`` ends every process it
started. It writes only pods' status, deletes only Terminating pods, and may not touch anything else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Collection
from pathlib import Path

from environments_operator.devcluster.apimachinery import JSON, ApiError
from environments_operator.devcluster.kube import PODS, SECRETS, Kube
from environments_operator.devcluster.kubelet import (
    Kubelet,
    cancel_all,
    condition,
    waits_for_kubelet,
)

LOCAL_COMMAND = "environments-operator"
# Every pod of this node runs on this machine's loopback.
LOCAL_IP = "127.0.0.1"
DEFAULT_GRACE_SECONDS = 30
# How often a container waiting for its Secret is tried again (a real kubelet backs off up to minutes).
CONFIG_RETRY_SECONDS = 0.5
_FIELD_PATHS = {
    "metadata.name": lambda pod: pod["metadata"]["name"],
    "metadata.namespace": lambda pod: pod["metadata"]["namespace"],
    "metadata.uid": lambda pod: pod["metadata"]["uid"],
    "spec.nodeName": lambda pod: pod["spec"].get("nodeName") or "localhost",
    "spec.serviceAccountName": lambda pod: pod["spec"].get("serviceAccountName") or "default",
    "status.podIP": lambda pod: LOCAL_IP,
}


class ContainerConfigError(Exception):
    """The container cannot start as configured (a missing Secret or key, an unknown fieldRef)."""


@dataclasses.dataclass
class PodProcess:
    """One pod's worker process and where it keeps its files."""

    name: str
    namespace: str
    uid: str
    directory: Path
    process: asyncio.subprocess.Process
    grace_seconds: float
    waiter: asyncio.Task[None] | None = None
    terminating: bool = False

    @property
    def log_path(self) -> Path:
        return self.directory / "container.log"


def worker_container(pod: JSON) -> JSON:
    """The container a WorkerPool puts the worker in: the one named ``worker``, else the first."""
    containers = pod["spec"].get("containers") or [{}]
    return next((c for c in containers if c.get("name") == "worker"), containers[0])


def local_argv(container: JSON, python: str = sys.executable) -> list[str]:
    """The container's ``command`` + ``args``, with ``environments-operator`` run by this Python."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if argv and argv[0] == LOCAL_COMMAND:
        return [python, "-m", "environments_operator", *argv[1:]]
    return argv


class ProcessKubelet:
    """Runs the worker pods of a ``Kube`` as local processes (see the module docstring).

    ```py
    kubelet = ProcessKubelet(kube, images={"environments-operator:0.1.0"}, root=tmp_path)
    kubelet.start()
    ...
    await kubelet.stop()      # SIGTERM, then SIGKILL, to every process it started
    ```
    """

    def __init__(self, kube: Kube, *, images: Collection[str], root: Path, python: str = sys.executable,
                 stop_grace_seconds: float = 5.0) -> None:
        self.kube = kube
        self.images = frozenset(images)
        self.root = root
        self.python = python
        self.stop_grace_seconds = stop_grace_seconds
        self.processes: dict[str, PodProcess] = {}  # by pod uid
        self.exit_codes: dict[str, int] = {}  # pod name -> exit code, for every process that ended
        self.started: list[str] = []  # pod names, in the order their processes started
        self._status = Kubelet(kube)
        self._watcher: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Task[None]] = {}  # pods waiting for a Secret, by uid
        self._gated: set[str] = set()
        self.lost: set[str] = set()  # names of pods whose node is lost (see ``lose``)

    # --- lifecycle of the kubelet itself ------------------------------------------------------------------

    def start(self) -> None:
        if self._watcher is not None:
            raise RuntimeError("the process kubelet is already running")
        self._watcher = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching, and end every process: SIGTERM to its group, SIGKILL after the grace."""
        await cancel_all([self._watcher, *self._pending.values()])
        self._watcher = None
        running = list(self.processes.values())
        for pod in running:
            self._signal(pod, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.stop_grace_seconds):
                await asyncio.gather(*(pod.process.wait() for pod in running))
        for pod in running:
            self._signal(pod, signal.SIGKILL)
        await asyncio.gather(*(pod.process.wait() for pod in running))
        for pod in running:
            if pod.waiter is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await pod.waiter

    def lose(self, name: str) -> None:
        """Declare the node of pod ``name`` lost: when the pod is deleted its process is still killed (no
        process outlives the test), but nothing is reported any more: no exit status, and a graceful
        deletion is never finished, so the pod stays Terminating."""
        self.lost.add(name)

    def log(self, name: str) -> str:
        """Everything the pod's process printed, for pods started by this kubelet."""
        path = self.root / name / "container.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- watching -----------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        changes = self.kube.changes(PODS)  # subscribe before scanning, so no pod slips in between
        for pod in self.kube.list(PODS):
            await self._consider(pod)
        async for change in changes:
            if change.type == "DELETED":
                self._terminate(change.object["metadata"]["uid"])
            else:
                await self._consider(change.object)

    async def _consider(self, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        if pod["metadata"].get("deletionTimestamp"):
            self._terminate(uid, pod["metadata"].get("deletionGracePeriodSeconds"))
            if uid not in self.processes:
                self._finish_deletion(pod["metadata"]["name"], pod["metadata"]["namespace"], uid)
            return
        if uid in self.processes or uid in self._pending or pod.get("status", {}).get("phase") != "Pending":
            return
        if pod["spec"].get("schedulingGates"):
            if uid not in self._gated:
                self._gated.add(uid)
                gated = condition("PodScheduled", False, "SchedulingGated",
                                  "Scheduling is blocked due to non-empty scheduling gates")
                self._write_status(pod, {"phase": "Pending", "conditions": [gated]})
            return
        self._gated.discard(uid)
        container = worker_container(pod)
        image = container.get("image", "")
        if image not in self.images:
            self._waiting(pod, "ErrImageNeverPull",
                          f'image "{image}" is not present on this simulated node; it runs only '
                          f"{', '.join(sorted(self.images))}")
            return
        self._pending[uid] = asyncio.create_task(self._start_when_configured(pod, container))

    async def _start_when_configured(self, pod: JSON, container: JSON) -> None:
        uid, name, namespace = pod["metadata"]["uid"], pod["metadata"]["name"], pod["metadata"]["namespace"]
        try:
            while True:
                current = self.kube.get(PODS, name, namespace)
                if current is None or current["metadata"]["uid"] != uid or current["metadata"].get("deletionTimestamp"):
                    return
                try:
                    environment = self._environment(current, container)
                    break
                except ContainerConfigError as problem:
                    self._waiting(current, "CreateContainerConfigError", str(problem))
                await asyncio.sleep(CONFIG_RETRY_SECONDS)
            await self._spawn(current, container, environment)
        finally:
            self._pending.pop(uid, None)

    # --- one pod --------------------------------------------------------------------------------------------

    def _environment(self, pod: JSON, container: JSON) -> dict[str, str]:
        directory = self.root / pod["metadata"]["name"]
        # The image's own ENV (HOME and TMPDIR on its writable /tmp), then the container's env.
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": pod["metadata"]["name"],
                       "HOME": str(directory / "tmp"), "TMPDIR": str(directory / "tmp"), "PYTHONUNBUFFERED": "1"}
        for variable in container.get("env") or []:
            environment[variable["name"]] = self._value(pod, variable)
        return environment

    def _value(self, pod: JSON, variable: JSON) -> str:
        if "valueFrom" not in variable:
            return str(variable.get("value", ""))
        source = variable["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = self.kube.get(SECRETS, ref["name"], pod["metadata"]["namespace"])
            if secret is None:
                raise ContainerConfigError(f'secret "{ref["name"]}" not found')
            data = secret.get("data") or {}
            if ref["key"] not in data:
                raise ContainerConfigError(f"couldn't find key {ref['key']} in Secret "
                                           f"{pod['metadata']['namespace']}/{ref['name']}")
            return base64.b64decode(data[ref["key"]]).decode()
        if "fieldRef" in source:
            path = source["fieldRef"].get("fieldPath", "")
            if path not in _FIELD_PATHS:
                raise ContainerConfigError(f"unsupported fieldRef {path!r} in the simulated cluster")
            return str(_FIELD_PATHS[path](pod))
        raise ContainerConfigError(f"env {variable['name']}: only value, secretKeyRef and fieldRef are simulated")

    async def _spawn(self, pod: JSON, container: JSON, environment: dict[str, str]) -> None:
        name, namespace, uid = pod["metadata"]["name"], pod["metadata"]["namespace"], pod["metadata"]["uid"]
        directory = self.root / name
        for sub in ("workspace", "tmp"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        argv = local_argv(container, self.python)
        if not argv:
            self._waiting(pod, "CreateContainerError", "no command: the image's default command is not simulated")
            return
        with (directory / "container.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=directory / "workspace", env=environment, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        grace = pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
        running = PodProcess(name, namespace, uid, directory, process, float(grace))
        self.processes[uid] = running
        self.started.append(name)
        with contextlib.suppress(ApiError, LookupError):
            self._status.run(name, namespace, host_ip=LOCAL_IP, pod_ip=LOCAL_IP)
        running.waiter = asyncio.create_task(self._wait(running))

    async def _wait(self, running: PodProcess) -> None:
        code = await running.process.wait()
        exit_code = 128 - code if code < 0 else code  # killed by signal N: 128+N, as a runtime reports it
        self.exit_codes[running.name] = exit_code
        self.processes.pop(running.uid, None)
        pod = self.kube.get(PODS, running.name, running.namespace)
        if pod is None or pod["metadata"]["uid"] != running.uid or running.name in self.lost:
            return
        with contextlib.suppress(ApiError, LookupError):
            if exit_code == 0:
                self._status.succeed(running.name, running.namespace)
            else:
                reason = "OOMKilled" if exit_code == 137 and not running.terminating else "Error"
                self._status.fail(running.name, running.namespace, exit_code=exit_code, reason=reason)
        self._finish_deletion(running.name, running.namespace, running.uid)

    def _finish_deletion(self, name: str, namespace: str, uid: str) -> None:
        """Remove a Terminating pod that no process of ours runs for any more (``graceful_pod_deletion``)."""
        pod = self.kube.get(PODS, name, namespace)
        if name in self.lost or pod is None or pod["metadata"]["uid"] != uid or not waits_for_kubelet(pod):
            return
        with contextlib.suppress(ApiError, LookupError):
            self.kube.delete(PODS, name, namespace, grace_period_seconds=0)

    def _terminate(self, uid: str, grace_seconds: float | None = None) -> None:
        pending = self._pending.pop(uid, None)
        if pending is not None:
            pending.cancel()
        running = self.processes.get(uid)
        if running is None or running.terminating:
            return
        running.terminating = True
        self._signal(running, signal.SIGTERM)
        asyncio.get_running_loop().call_later(grace_seconds or running.grace_seconds, self._signal, running,
                                              signal.SIGKILL)

    @staticmethod
    def _signal(running: PodProcess, signum: int) -> None:
        if running.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(running.process.pid, signum)

    # --- status ---------------------------------------------------------------------------------------------

    def _waiting(self, pod: JSON, reason: str, message: str) -> None:
        with contextlib.suppress(ApiError, LookupError):  # the pod went away meanwhile
            self._status.waiting(pod["metadata"]["name"], pod["metadata"]["namespace"], reason, message,
                                 host_ip=LOCAL_IP)

    def _write_status(self, pod: JSON, status: JSON) -> None:
        with contextlib.suppress(ApiError, LookupError):
            self.kube.patch_status(PODS, pod["metadata"]["name"], status, pod["metadata"]["namespace"])
