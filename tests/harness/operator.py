"""Run the real kopf operator loop against the fake apiserver: in-process (and killable), or as the real CLI.

In-process, each operator start gets its own thread and event loop, as a separate process would:

    async with run_operator(kube, registry=registry, namespaces=["ns"]) as operator:
        kube.create(WORKERPOOLS, {...}, namespace="ns")
        await kube.wait_for(WORKERPOOLS, "wp", lambda o: o and o.get("status"), namespace="ns")
        operator.kill()            # a crash: the loop stops dead, sockets close, no cleanup code runs
        await operator.start()     # a fresh operator (new settings, memo, connections) on the same state

``start()`` returns once kopf is watching every declared resource its registry has handlers for (so
nothing created afterwards is missed); ``stop()`` is a graceful shutdown (stop-flag) that re-raises
the operator's own failure, if it had one.

Why a thread and not a task in the test's loop: kopf's ``run_tasks`` cancels every task created after
it started (the test's, the emulator's and kmock's included), and a task cannot be killed without
running its ``finally`` blocks. A private loop can simply stop, like a killed process. Caveat: code
already running in a worker thread (sync handlers, ``asyncio.to_thread``) finishes its current call
before it notices; prefer async handlers with short ``to_thread`` calls, as the design asks anyway.

Settings (``harness_settings``): the production persistence choice (``persistence_settings``: progress
in annotations, nothing in ``status.kopf``), then the test's ``settings_hook`` (pass the operator
package's own settings function here), then the timing overrides in ``fast_timings`` (these win).

What this module may not do: replace or patch any of the operator's code paths; it only starts them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from typing import Any

import kopf
from kopf._cogs.structs import credentials, references  # Vault/Resource are not re-exported by kopf 1.45

from environments_operator.devcluster.kube import DEFAULT_TIMEOUT, ENVIRONMENTS, WORKERPOOLS, Kube, Resource

SettingsHook = Callable[[kopf.OperatorSettings], None]

# Killed operators' event loops are kept referenced, never closed: closing or collecting them would run
# (or complain about) their pending coroutines, which is exactly what a crash must not do.
_KILLED_LOOPS: list[asyncio.AbstractEventLoop] = []


def persistence_settings(settings: kopf.OperatorSettings) -> None:
    """Where kopf keeps its own state; the production operator must use the same.

    The CRDs' structural schemas would prune ``status.kopf`` (kopf's default progress storage also
    writes there), so keep handler progress in annotations only. The diff-base is already in an
    annotation by default; set explicitly so that nobody changes one without the other.
    """
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage()


def fast_timings(settings: kopf.OperatorSettings) -> None:
    """React in milliseconds instead of kopf's production seconds; never SIGKILL the test process."""
    # kopf schedules a SIGKILL of its *thread* (the whole process, for signals) 10 min after a non-
    # graceful exit; a killed in-process operator must never trigger that.
    settings.process.ultimate_exiting_timeout = None
    settings.watching.reconnect_backoff = 0.05
    settings.watching.connect_timeout = 2
    settings.networking.connect_timeout = 2
    settings.networking.request_timeout = 15
    settings.networking.error_backoffs = (0.05, 0.1, 0.2, 0.5)
    settings.queueing.error_delays = (0.1, 0.2, 0.5, 1.0)
    settings.queueing.exit_timeout = 0.1  # at graceful stop, idle per-object workers wait this long
    settings.queueing.idle_timeout = 1.0
    # Handlers declared without `backoff=` retry unexpected errors after this (production default: 60 s).
    settings.execution.default_backoff = 0.2
    settings.background.cancellation_polling = 0.2


def harness_settings(settings_hook: SettingsHook | None = None) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    persistence_settings(settings)
    if settings_hook is not None:
        settings_hook(settings)
    fast_timings(settings)
    return settings


class OperatorFailed(AssertionError):
    """The operator exited on its own, did not start, or did not stop; the message carries its last logs."""


class _LogCollector(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]):
        super().__init__(level=logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclasses.dataclass
class _Instance:
    """One operator start: its thread, loop and flags (what a process would be)."""

    settings: kopf.OperatorSettings
    memo: Any
    ready: concurrent.futures.Future[Any]
    finished: asyncio.Future[BaseException | None]
    loop: asyncio.AbstractEventLoop | None = None
    stop_flag: asyncio.Event | None = None
    thread: threading.Thread | None = None
    killed: bool = False


class OperatorRunner:
    """Starts, stops, kills and restarts one operator against one ``Kube``; see ``run_operator``."""

    def __init__(self, kube: Kube, *, registry: kopf.OperatorRegistry, namespaces: Collection[str] = (),
                 clusterwide: bool = False, settings_hook: SettingsHook | None = None,
                 memo_factory: Callable[[], Any] = kopf.Memo, standalone: bool = True,
                 peering_name: str | None = None, wait_watching: bool | Iterable[Resource] = True,
                 startup_timeout: float = DEFAULT_TIMEOUT):
        if bool(namespaces) == clusterwide:
            raise TypeError("pass either namespaces=[...] or clusterwide=True")
        self.kube = kube
        self.registry = registry
        self.namespaces = list(namespaces)
        self.clusterwide = clusterwide
        self.settings_hook = settings_hook
        self.memo_factory = memo_factory
        self.standalone = standalone
        self.peering_name = peering_name
        self.wait_watching = wait_watching
        self.startup_timeout = startup_timeout
        self.starts = 0
        self.logs: list[logging.LogRecord] = []
        self._instance: _Instance | None = None

    @property
    def running(self) -> bool:
        instance = self._instance
        return instance is not None and not instance.killed and not instance.finished.done()

    @property
    def settings(self) -> kopf.OperatorSettings:
        """The settings of the current (or last) start."""
        assert self._instance is not None, "the operator was never started"
        return self._instance.settings

    @property
    def memo(self) -> Any:
        """The memo of the current (or last) start: the only in-memory state a restart loses."""
        assert self._instance is not None, "the operator was never started"
        return self._instance.memo

    def log_text(self, level: int = logging.DEBUG) -> str:
        return "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.logs if r.levelno >= level)

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start a fresh operator and return once it is watching (or raise ``OperatorFailed``)."""
        if self.running:
            raise RuntimeError("the operator is already running; stop() or kill() it first")
        for namespace in self.namespaces:
            if not any(char in namespace for char in "*?[!"):
                self.kube.ensure_namespace(namespace)  # kopf serves only namespaces that exist
        since = len(self.kube.calls)
        instance = _Instance(settings=harness_settings(self.settings_hook), memo=self.memo_factory(),
                             ready=concurrent.futures.Future(), finished=asyncio.get_running_loop().create_future())
        self._instance = instance
        self.starts += 1
        instance.thread = threading.Thread(target=self._thread_main, args=(instance, asyncio.get_running_loop()),
                                           name=f"kopf-operator-{self.starts}", daemon=True)
        instance.thread.start()
        try:
            await self._wait_started(instance, since)
        except BaseException:
            self.kill()
            raise

    async def stop(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Graceful shutdown via kopf's stop-flag; re-raise the operator's failure if it had one."""
        instance = self._instance
        if instance is None or instance.killed:
            return
        if not instance.finished.done() and instance.loop is not None and instance.stop_flag is not None:
            instance.loop.call_soon_threadsafe(instance.stop_flag.set)
        try:
            outcome = await asyncio.wait_for(asyncio.shield(instance.finished), timeout)
        except TimeoutError:
            self.kill()
            raise OperatorFailed(f"the operator did not stop within {timeout}s:\n{self.log_text(logging.INFO)}")\
                from None
        if outcome is not None:
            raise OperatorFailed(f"the operator failed: {outcome!r}\n{self.log_text(logging.INFO)}") from outcome

    def kill(self) -> None:
        """Crash the operator: its event loop stops between two steps and its connections drop.

        Nothing of it runs any more (no finally blocks, no kopf shutdown, no cleanup handlers); whatever
        it wrote to the apiserver stays, whatever it had in memory is lost. Synchronous: the next
        ``start()`` may follow at once.
        """
        instance = self._instance
        if instance is None or instance.killed or instance.finished.done() or instance.loop is None:
            return
        instance.killed = True
        loop = instance.loop
        loop.call_soon_threadsafe(loop.stop)
        if instance.thread is not None:
            instance.thread.join(timeout=DEFAULT_TIMEOUT)
        if not instance.finished.done():
            instance.finished.set_result(None)
        # The killed loop keeps its tasks pending forever. Collecting them at interpreter exit, after the
        # loop objects were torn down, segfaults CPython 3.11; freezing keeps the collector away from them.
        gc.freeze()

    async def restart(self, *, abrupt: bool = True) -> None:
        """``kill()`` (or ``stop()`` if not abrupt), then ``start()``."""
        if abrupt:
            self.kill()
        else:
            await self.stop()
        await self.start()

    # --- the operator's thread ----------------------------------------------------------------------------

    def _thread_main(self, instance: _Instance, test_loop: asyncio.AbstractEventLoop) -> None:
        loop = instance.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        outcome: BaseException | None = None
        try:
            loop.run_until_complete(self._operator_main(instance))
        except BaseException as error:  # incl. "Event loop stopped before Future completed" on kill()
            outcome = error
        if instance.killed:
            outcome = None
            self._drop_connections(loop)
            loop.set_exception_handler(lambda _loop, _context: None)
            _KILLED_LOOPS.append(loop)
        else:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        def report() -> None:
            if not instance.finished.done():
                instance.finished.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # the test's loop may be gone at interpreter exit
            test_loop.call_soon_threadsafe(report)

    @staticmethod
    def _drop_connections(loop: asyncio.AbstractEventLoop) -> None:
        # What the kernel does for a killed process: the peer sees its connections end.
        for transport in list(getattr(loop, "_transports", {}).values()):
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    async def _operator_main(self, instance: _Instance) -> None:
        instance.stop_flag = asyncio.Event()
        # A pre-filled credentials vault: kopf skips its login handlers (the production registry may
        # carry its own), and the operator talks to this fake apiserver only.
        vault = credentials.Vault({"harness": kopf.ConnectionInfo(server=self.kube.url, default_namespace="default")})
        await kopf.operator(
            registry=self.registry, settings=instance.settings, memo=instance.memo, vault=vault,
            namespaces=self.namespaces, clusterwide=self.clusterwide, standalone=self.standalone,
            peering_name=self.peering_name, stop_flag=instance.stop_flag, ready_flag=instance.ready,
        )

    # --- readiness ----------------------------------------------------------------------------------------

    async def _wait_started(self, instance: _Instance, since: int) -> None:
        ready = asyncio.wrap_future(instance.ready)
        done, _ = await asyncio.wait({ready, instance.finished}, timeout=self.startup_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if instance.finished in done:
            raise OperatorFailed(f"the operator exited during startup: {instance.finished.result()!r}\n"
                                 f"{self.log_text(logging.INFO)}")
        if not done:
            raise OperatorFailed(f"startup handlers did not finish in {self.startup_timeout}s\n"
                                 f"{self.log_text(logging.INFO)}")
        expected = self._expected_watches()

        def missing() -> set[tuple[str, str, str | None]]:
            if instance.finished.done():
                raise OperatorFailed(f"the operator exited: {instance.finished.result()!r}\n"
                                     f"{self.log_text(logging.INFO)}")
            seen = {(c.group, c.resource, c.namespace) for c in self.kube.calls[since:] if c.verb == "watch"}
            return expected - seen

        await self.kube.wait_until(lambda: not missing(), timeout=self.startup_timeout,
                                   message=lambda: f"the operator to watch {sorted(missing(), key=str)}")

    def _expected_watches(self) -> set[tuple[str, str, str | None]]:
        if self.wait_watching is False:
            return set()
        if self.wait_watching is True:
            resources = self._resources_with_handlers()
        else:
            resources = list(self.wait_watching)
        exact = [ns for ns in self.namespaces if not any(char in ns for char in "*?[!")]
        return {(r.group, r.plural, namespace)
                for r in resources
                for namespace in ([None] if self.clusterwide or not r.namespaced else exact)}

    def _resources_with_handlers(self) -> list[Resource]:
        # kopf's own selection (private API, as kopf 1.45 offers no public one): which declared
        # resources match the selectors of the registry's resource handlers.
        registry = self.registry
        selectors = (registry._indexing.get_all_selectors() | registry._watching.get_all_selectors()
                     | registry._spawning.get_all_selectors() | registry._changing.get_all_selectors())
        matched = []
        for key in sorted(self.kube.server._declared):
            resource = self.kube.server._declared[key]
            candidate = references.Resource(
                group=resource.group, version=resource.version, plural=resource.plural, kind=resource.kind,
                singular=resource.kind.lower(), shortcuts=frozenset(resource.shortnames),
                categories=frozenset(resource.categories), subresources=frozenset(resource.subresources),
                namespaced=resource.namespaced, preferred=True, verbs=frozenset(resource.verbs),
            )
            if any(selector.check(candidate) for selector in selectors):
                matched.append(resource)
        return matched


@contextlib.contextmanager
def _operator_environment(kube: Kube, loggers: Iterable[str], level: int,
                          records: list[logging.LogRecord]) -> Any:
    """KUBECONFIG pointing at the fake apiserver (for the operator's own ``kubernetes`` clients), and its
    loggers collected into ``records`` at ``level``; both restored afterwards."""
    previous_kubeconfig = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kube.kubeconfig)
    # kubernetes.config reads $KUBECONFIG once, at import; `load_kube_config()` uses that copy.
    import kubernetes.config.kube_config as kube_config_module
    previous_default = kube_config_module.KUBE_CONFIG_DEFAULT_LOCATION
    kube_config_module.KUBE_CONFIG_DEFAULT_LOCATION = str(kube.kubeconfig)
    collector = _LogCollector(records)
    previous_levels = {}
    for name in loggers:
        logger = logging.getLogger(name)
        previous_levels[name] = logger.level
        if logger.getEffectiveLevel() > level:
            logger.setLevel(level)
        logger.addHandler(collector)
    try:
        yield
    finally:
        for name, previous_level in previous_levels.items():
            logging.getLogger(name).removeHandler(collector)
            logging.getLogger(name).setLevel(previous_level)
        kube_config_module.KUBE_CONFIG_DEFAULT_LOCATION = previous_default
        if previous_kubeconfig is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous_kubeconfig


@contextlib.asynccontextmanager
async def run_operator(
    kube: Kube,
    *,
    registry: kopf.OperatorRegistry,
    namespaces: Collection[str] = (),
    clusterwide: bool = False,
    settings_hook: SettingsHook | None = None,
    memo_factory: Callable[[], Any] = kopf.Memo,
    standalone: bool = True,
    peering_name: str | None = None,
    wait_watching: bool | Iterable[Resource] = True,
    startup_timeout: float = DEFAULT_TIMEOUT,
    log_level: int = logging.INFO,
    loggers: Iterable[str] = ("kopf", "environments_operator"),
) -> AsyncIterator[OperatorRunner]:
    """Run the real kopf loop with ``registry`` against ``kube`` for the duration of the block.

    - ``namespaces`` (plain names or kopf globs) or ``clusterwide=True``; plain namespaces are created.
    - ``settings_hook(settings)``: the operator package's settings function (see ``harness_settings``).
    - ``memo_factory``: a fresh memo per start (a restart must not inherit in-memory state).
    - ``standalone=False`` (+ ``peering_name``) to run with kopf peering (KopfPeering objects).
    - ``wait_watching``: True waits for a watch on every declared resource the registry has handlers for;
      or give the resources to wait for; False waits only for the startup handlers.
    - ``KUBECONFIG`` (and ``kubernetes.config``'s import-time copy of it) points at ``kube`` meanwhile, so
      the operator's own ``kubernetes`` clients (``load_kube_config()``) reach it.
    - Records of ``loggers`` at ``log_level`` and above land in ``runner.logs`` (e.g. to assert that no
      secret is ever logged).
    On exit, a running operator is stopped gracefully, and its failure (if any) fails the test.
    """
    runner = OperatorRunner(kube, registry=registry, namespaces=namespaces, clusterwide=clusterwide,
                            settings_hook=settings_hook, memo_factory=memo_factory, standalone=standalone,
                            peering_name=peering_name, wait_watching=wait_watching,
                            startup_timeout=startup_timeout)
    with _operator_environment(kube, loggers, log_level, runner.logs):
        await runner.start()
        try:
            yield runner
        except BaseException:
            runner.kill()
            raise
        await runner.stop()


# --- the real CLI as a subprocess ---------------------------------------------------------------------------


class OperatorExited(OperatorFailed):
    """The ``environments-operator run`` process exited before it was watching."""

    def __init__(self, returncode: int, output: str):
        super().__init__(f"the operator process exited with {returncode} before watching:\n{output}")
        self.returncode = returncode
        self.output = output


@dataclasses.dataclass
class OperatorProcess:
    process: asyncio.subprocess.Process
    lines: list[str]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def terminate(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """SIGTERM (what Kubernetes sends first), then SIGKILL after ``timeout``; return the exit code."""
        if self.process.returncode is None:
            self.process.terminate()
            try:
                return await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
        return await self.process.wait()

    async def kill(self) -> int:
        if self.process.returncode is None:
            self.process.kill()
        return await self.process.wait()


@contextlib.asynccontextmanager
async def run_operator_process(
    kube: Kube,
    *,
    args: Iterable[str] = ("run", "--all-namespaces", "--standalone"),
    env: Mapping[str, str] | None = None,
    watching: Iterable[tuple[Resource, str | None]] = ((ENVIRONMENTS, None), (WORKERPOOLS, None)),
    startup_timeout: float = 30.0,
) -> AsyncIterator[OperatorProcess]:
    """Run ``python -m environments_operator <args>`` with ``KUBECONFIG`` pointing at ``kube``.

    Returns once the process watches every ``(resource, namespace)`` in ``watching`` (namespace None:
    cluster-wide); raises ``OperatorExited`` if it exits first. ``env`` adds to the inherited
    environment (e.g. ``ANTHROPIC_BASE_URL`` of the emulator). Terminated (SIGTERM) on exit.
    """
    since = len(kube.calls)
    full_env = {**os.environ, "KUBECONFIG": str(kube.kubeconfig), "PYTHONUNBUFFERED": "1", **(env or {})}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "environments_operator", *args, env=full_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    running = OperatorProcess(process, [])

    async def collect() -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            running.lines.append(line.decode(errors="replace"))

    collector = asyncio.create_task(collect())
    expected = {(resource.group, resource.plural, namespace) for resource, namespace in watching}
    try:
        def watching_all() -> bool:
            if process.returncode is not None:
                raise OperatorExited(process.returncode, running.output)
            seen = {(c.group, c.resource, c.namespace) for c in kube.calls[since:] if c.verb == "watch"}
            return expected <= seen

        async def exited() -> None:
            await process.wait()
            await asyncio.wait_for(asyncio.shield(collector), 1.0)

        waiter = asyncio.ensure_future(kube.wait_until(
            watching_all, timeout=startup_timeout,
            message=lambda: f"the operator process to watch {sorted(expected)}; its output:\n{running.output}"))
        exit_waiter = asyncio.ensure_future(exited())
        await asyncio.wait({waiter, exit_waiter}, return_when=asyncio.FIRST_COMPLETED)
        exit_waiter.cancel()
        if not waiter.done():
            waiter.cancel()
            raise OperatorExited(process.returncode or 0, running.output)
        waiter.result()
        yield running
    finally:
        await running.terminate()
        collector.cancel()
