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
  plus ``HOSTNAME`` (the pod's name), ``PATH``, and ``KUBERNETES_SERVICE_HOST``/``KUBERNETES_SERVICE_PORT``
  (the in-cluster front's address, which a real kubelet injects into every container); a fresh working
  directory, which is also its HOME and TMPDIR, per pod; a missing Secret or key keeps the container
  waiting in ``CreateContainerConfigError``;
- in-cluster API access: the kubelet is given an ``InClusterFront`` (``incluster``) or starts one of its own.
  Unless ``spec.automountServiceAccountToken`` (else the ServiceAccount's) is false, it issues a token of
  the pod's ServiceAccount (``spec.serviceAccountName``, else ``default``) at the front, writes ``token``,
  ``ca.crt`` (the front's CA) and ``namespace`` into the pod's directory, and runs the process in a mount
  namespace of its own (``unshare -m``) where that directory is bind-mounted read-only at
  ``/var/run/secrets/kubernetes.io/serviceaccount``; the wrapper ``exec``s the command, so the process, its
  signals and its exit code are the container's own. The token is revoked when the process ends. A
  ServiceAccount that does not exist (``default`` always does) keeps the container waiting in
  ``CreateContainerConfigError``; where a mount namespace cannot be made (not root, no ``unshare``), the
  container waits in ``CreateContainerError`` with the reason, as no token can reach it;
- phases ``Pending`` → ``Running`` → ``Succeeded``/``Failed``, with container statuses and exit codes
  (a process killed by signal N exits ``128+N``, as a container runtime reports it);
- when the pod is deleted, SIGTERM to the process group, then SIGKILL after the deletion's grace period
  (``deletionGracePeriodSeconds``, else the pod's ``terminationGracePeriodSeconds``, default 30);
- with ``kube.graceful_pod_deletion``, a Terminating pod is removed (a delete with grace 0, as a kubelet
  sends) once its process has exited, or at once if it has none; ``lose(name)`` declares that pod's node
  lost: its process is still killed on deletion, but no status is written after it exits and the pod
  stays Terminating (until a test force-deletes it).

Not emulated: volumes and ``volumeMounts`` other than the service-account token (``emptyDir``, ``secret``,
projected volumes), init and sidecar containers (only the worker container runs), resource
limits, probes, restarts (worker pods are ``restartPolicy: Never``). ``stop()`` ends every process it
started (and the front, if it started it). It writes only pods' status, deletes only Terminating pods, issues
and revokes tokens at the front, and may not touch anything else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
from collections.abc import Collection
from pathlib import Path

from environments_operator.devcluster.apimachinery import JSON, ApiError
from environments_operator.devcluster.incluster import InClusterFront
from environments_operator.devcluster.kube import PODS, SECRETS, SERVICEACCOUNTS, Kube
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
# Where a pod's ServiceAccount token, ca.crt and namespace are, as every in-cluster client looks for them.
SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
# The wrapper of a pod with a token: a mount namespace of its own (private, so nothing leaks back to this
# machine), the token's directory bind-mounted read-only, then exec: the command is the same process.
UNSHARE_ARGV = ("unshare", "--mount", "--propagation", "private")
_MOUNT_SCRIPT = 'mount --bind -o ro "$1" "$2" && shift 2 && exec "$@"'
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
    token: str | None = None  # its ServiceAccount token at the in-cluster front, revoked when it ends

    @property
    def log_path(self) -> Path:
        return self.directory / "container.log"


def worker_container(pod: JSON) -> JSON:
    """The container a WorkerPool puts the worker in: the one named ``worker``, else the first."""
    containers = pod["spec"].get("containers") or [{}]
    return next((c for c in containers if c.get("name") == "worker"), containers[0])


def _make_directories(*paths: Path) -> None:
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)


def service_account_name(pod: JSON) -> str:
    return pod["spec"].get("serviceAccountName") or pod["spec"].get("serviceAccount") or "default"


def local_argv(container: JSON, python: str = sys.executable) -> list[str]:
    """The container's ``command`` + ``args``, with ``environments-operator`` run by this Python."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if argv and argv[0] == LOCAL_COMMAND:
        return [python, "-m", "environments_operator", *argv[1:]]
    return argv


class ProcessKubelet:
    """Runs the worker pods of a ``Kube`` as local processes (see the module docstring).

    ```py
    kubelet = ProcessKubelet(kube, images={"environments-operator:0.1.0"}, root=tmp_path)   # front=... optional
    kubelet.start()
    ...
    await kubelet.stop()      # SIGTERM, then SIGKILL, to every process it started
    ```
    """

    @property
    def front(self) -> InClusterFront:
        """The in-cluster front its pods reach the API through (started once the kubelet runs)."""
        if self._front is None:
            raise RuntimeError("the process kubelet has not started its in-cluster front yet")
        return self._front

    def __init__(self, kube: Kube, *, images: Collection[str], root: Path, python: str = sys.executable,
                 stop_grace_seconds: float = 5.0, front: InClusterFront | None = None) -> None:
        self.kube = kube
        # The pods' apiserver; one of its own is started (and stopped) with the kubelet if none is given.
        self._front = front
        self._owns_front = front is None
        self._mount_problem: str | None = None
        self._mounts_probed = False
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
        if self._owns_front and self._front is not None:
            await self._front.stop()
            self._front = None

    def lose(self, name: str) -> None:
        """Declare the node of pod ``name`` lost: when the pod is deleted its process is still killed (no
        process outlives the test), but nothing is reported any more: no exit status, and a graceful
        deletion is never finished, so the pod stays Terminating."""
        self.lost.add(name)

    def kill(self, name: str) -> None:
        """SIGKILL the process of pod ``name`` (its container dies: the pod fails with exit code 137)."""
        for running in list(self.processes.values()):
            if running.name == name:
                self._signal(running, signal.SIGKILL)

    def log(self, name: str) -> str:
        """Everything the pod's process printed, for pods started by this kubelet."""
        path = self.root / name / "container.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- watching -----------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        if self._front is None:
            self._front = InClusterFront(self.kube)
        if not self._front.started:
            await self._front.start()
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
                    mounts_token = self._mounts_token(current)
                    break
                except ContainerConfigError as problem:
                    self._waiting(current, "CreateContainerConfigError", str(problem))
                await asyncio.sleep(CONFIG_RETRY_SECONDS)
            await self._spawn(current, container, environment, mounts_token)
        finally:
            self._pending.pop(uid, None)

    # --- one pod --------------------------------------------------------------------------------------------

    def _environment(self, pod: JSON, container: JSON) -> dict[str, str]:
        directory = self.root / pod["metadata"]["name"]
        # The image's own ENV (HOME and TMPDIR on its writable /tmp), then the container's env.
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": pod["metadata"]["name"],
                       "HOME": str(directory / "tmp"), "TMPDIR": str(directory / "tmp"), "PYTHONUNBUFFERED": "1",
                       # The kubernetes Service's address, which a kubelet gives every container.
                       "KUBERNETES_SERVICE_HOST": self.front.host, "KUBERNETES_SERVICE_PORT": str(self.front.port)}
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

    def _mounts_token(self, pod: JSON) -> bool:
        """Whether the pod gets its ServiceAccount's token; a missing ServiceAccount is a config error."""
        account = service_account_name(pod)
        stored = self.kube.get(SERVICEACCOUNTS, account, pod["metadata"]["namespace"])
        if stored is None and account != "default":
            raise ContainerConfigError(f'serviceaccount "{account}" not found')
        automount = pod["spec"].get("automountServiceAccountToken")
        if automount is None and stored is not None:
            automount = stored.get("automountServiceAccountToken")
        return automount is not False

    async def _probe_mounts(self) -> str | None:
        """Why no pod here can get a token mount (None: it can), found out once by trying it."""
        if self._mounts_probed:
            return self._mount_problem
        self._mounts_probed = True
        probe = self.root / ".mount-probe"
        try:
            _make_directories(probe, Path(SERVICE_ACCOUNT_PATH))  # a mount point must exist on this machine
            process = await asyncio.create_subprocess_exec(
                *UNSHARE_ARGV, "sh", "-c", _MOUNT_SCRIPT, "mount-probe", str(probe), SERVICE_ACCOUNT_PATH, "true",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            output, _ = await process.communicate()
            if process.returncode != 0:
                self._mount_problem = output.decode(errors="replace").strip() or f"exit code {process.returncode}"
        except OSError as error:
            self._mount_problem = str(error)
        return self._mount_problem

    def _write_service_account(self, pod: JSON, directory: Path, token: str) -> Path:
        """The token volume's files: ``token``, ``ca.crt`` and ``namespace``."""
        volume = directory / "serviceaccount"
        volume.mkdir(parents=True, exist_ok=True)
        (volume / "token").write_text(token)
        (volume / "ca.crt").write_bytes(self.front.ca_pem)
        (volume / "namespace").write_text(pod["metadata"]["namespace"])
        return volume

    async def _spawn(self, pod: JSON, container: JSON, environment: dict[str, str], mounts_token: bool) -> None:
        name, namespace, uid = pod["metadata"]["name"], pod["metadata"]["namespace"], pod["metadata"]["uid"]
        directory = self.root / name
        for sub in ("workspace", "tmp"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        argv = local_argv(container, self.python)
        if not argv:
            self._waiting(pod, "CreateContainerError", "no command: the image's default command is not simulated")
            return
        token = None
        if mounts_token:
            problem = await self._probe_mounts()
            if problem is not None:
                self._waiting(pod, "CreateContainerError", f"cannot mount the service-account token at "
                              f"{SERVICE_ACCOUNT_PATH}: this node needs a mount namespace per pod (unshare -m "
                              f"and mount --bind, as root): {problem}")
                return
            token = self.front.issue_token(namespace, service_account_name(pod))
            volume = self._write_service_account(pod, directory, token)
            # The command is looked up in the pod's PATH by exec, as the runtime would.
            argv = [*UNSHARE_ARGV, shutil.which("sh") or "/bin/sh", "-c", _MOUNT_SCRIPT, "pod-mounts", str(volume),
                    SERVICE_ACCOUNT_PATH, *argv]
        with (directory / "container.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=directory / "workspace", env=environment, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        grace = pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
        running = PodProcess(name, namespace, uid, directory, process, float(grace), token=token)
        self.processes[uid] = running
        self.started.append(name)
        with contextlib.suppress(ApiError, LookupError):
            self._status.run(name, namespace, host_ip=LOCAL_IP, pod_ip=LOCAL_IP)
        running.waiter = asyncio.create_task(self._wait(running))

    async def _wait(self, running: PodProcess) -> None:
        code = await running.process.wait()
        if running.token is not None:
            self.front.revoke_token(running.token)  # a bound token dies with its pod
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
