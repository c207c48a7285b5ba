"""``environments-operator demo`` as a user runs it: a real process tree, ended cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from environments_operator.worker import descendant_pids

pytestmark = pytest.mark.timeout(240)


class ProcessTree:
    """Every process the demo started, sampled while it runs (orphans lose their parent link)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: set[int] = set()
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.seen.update(descendant_pids(self.root))
            await asyncio.sleep(0.1)

    async def survivors(self) -> list[str]:
        self._task.cancel()
        await asyncio.sleep(0.5)
        alive = []
        for pid in sorted(self.seen):
            try:
                alive.append((Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                pass
        return alive


async def start_demo(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "environments_operator", "demo", *args,
        env={k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


async def test_demo_serves_its_sessions_and_leaves_no_process_behind() -> None:
    demo = await start_demo("--sessions", "3")
    tree = ProcessTree(demo.pid)
    output, _ = await asyncio.wait_for(demo.communicate(), timeout=200)
    lines = output.decode().splitlines()
    assert demo.returncode == 0, "\n".join(lines[-30:])
    assert "SIMULATED" in lines[0]
    assert re.fullmatch(r"demo: 3/3 sessions served \(session start p50 [\d.]+ s, max [\d.]+ s\)", lines[-1]), lines[-1]
    # Not on a terminal: plain lines, one per change of a session.
    assert any(re.match(r"demo: session session_\w+: served, pod work-\w+ deleted, tools 4/4", line) for line in lines)
    assert len(tree.seen) >= 4, "the operator and three worker pods ran as processes"
    assert await tree.survivors() == []


async def test_the_demo_with_warm_workers_serves_its_sessions_from_warm_pods() -> None:
    demo = await start_demo("--sessions", "2", "--min-workers", "2", "--max-workers", "3")
    tree = ProcessTree(demo.pid)
    output, _ = await asyncio.wait_for(demo.communicate(), timeout=200)
    lines = output.decode().splitlines()
    assert demo.returncode == 0, "\n".join(lines[-30:])
    assert any(line.startswith("demo: 2 warm worker pods running before any session") for line in lines), lines
    assert re.fullmatch(r"demo: 2/2 sessions served \(session start p50 [\d.]+ s, max [\d.]+ s\)", lines[-1]), lines[-1]
    assert any(re.match(r"demo: session session_\w+: served, pod sandboxes-warm-\w+ deleted", line) for line in lines)
    assert await tree.survivors() == []


async def test_sigterm_ends_a_kept_running_demo_and_everything_it_started() -> None:
    demo = await start_demo("--sessions", "1", "--keep-running")
    tree = ProcessTree(demo.pid)
    assert demo.stdout is not None
    seen = []
    async with asyncio.timeout(200):
        async for raw in demo.stdout:
            seen.append(raw.decode())
            if "still running" in seen[-1]:
                break
    instructions = await read_more(demo)
    assert any("kubectl get environments,workerpools,pods" in line for line in instructions)
    # Idle now: a few of the pool's long-polls go by, and the operator logs none of them.
    kubeconfig = next(line.split("KUBECONFIG=")[1].strip() for line in instructions if "KUBECONFIG=" in line)
    await asyncio.sleep(3)
    operator_log = (Path(kubeconfig).parent / "operator.log").read_text()
    assert "work/poll" not in operator_log and "HTTP Request" not in operator_log, operator_log[-2000:]
    demo.send_signal(signal.SIGTERM)
    await asyncio.wait_for(demo.wait(), timeout=60)
    assert demo.returncode == 130, "".join(seen[-20:])
    assert tree.seen and await tree.survivors() == []


async def read_more(process: asyncio.subprocess.Process, lines: int = 4) -> list[str]:
    assert process.stdout is not None
    return [(await asyncio.wait_for(process.stdout.readline(), 10)).decode() for _ in range(lines)]
