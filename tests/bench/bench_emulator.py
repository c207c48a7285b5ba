"""Benchmark: poll+ack pairs per second through the official SDK against the emulator.

Starts ``environments-operator emulator --port 0`` as its own process (as a user would run it), fills
a self_hosted environment's queue through ``POST /v1/sessions``, then times ``--pollers`` concurrent
SDK clients that each ``poll`` and ``ack`` until the queue is empty. Prints the median over
``--rounds`` rounds. ``--in-process`` serves the emulator on the benchmark's own event loop instead,
which shows the cost of sharing one core with the clients.

    .venv/bin/python tests/bench/bench_emulator.py [--items 2000] [--pollers 8] [--rounds 5] [--in-process] [--raw]

``--raw`` polls with plain aiohttp instead of the SDK, to show what the emulator itself sustains.

A script, not a test: it asserts only that every item was claimed exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from anthropic import AsyncAnthropic

API_KEY = "sk-ant-bench"
AGENT_ID = "agent_bench"


@asynccontextmanager
async def emulator_process() -> AsyncIterator[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "environments_operator",
        "emulator",
        "--port",
        "0",
        "--api-key",
        API_KEY,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
        match = re.fullmatch(r"listening on (\S+)\n", line)
        if not match:
            raise RuntimeError(f"unexpected first line from the emulator: {line!r}")
        yield match.group(1)
    finally:
        process.terminate()
        await process.wait()


@asynccontextmanager
async def emulator_in_process() -> AsyncIterator[str]:
    from environments_operator.emulator.server import EmulatorServer

    async with EmulatorServer(api_keys=[API_KEY]) as server:
        yield server.base_url


async def fill_queue(base_url: str, items: int) -> tuple[str, str]:
    """A fresh self_hosted environment with ``items`` queued work items; returns (id, environment key).

    Setup is untimed and goes over plain HTTP to keep the script short to run.
    """
    async with aiohttp.ClientSession(base_url=base_url, headers={"x-api-key": API_KEY}) as http:
        async with http.post("/v1/environments", json={"name": "bench", "config": {"type": "self_hosted"}}) as made:
            environment_id = (await made.json())["id"]
        async with http.post(f"/_emulator/environments/{environment_id}/environment-key") as issued:
            key = (await issued.json())["environment_key"]

        async def create_session() -> None:
            body = {"agent": AGENT_ID, "environment_id": environment_id}
            async with http.post("/v1/sessions", json=body) as response:
                response.raise_for_status()

        for start in range(0, items, 100):
            await asyncio.gather(*(create_session() for _ in range(min(100, items - start))))
    return environment_id, key


async def poll_and_ack(base_url: str, environment_id: str, key: str, worker_id: str) -> list[str]:
    claimed: list[str] = []
    async with AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0) as client:
        work = client.beta.environments.work
        while True:
            item = await work.poll(environment_id, anthropic_worker_id=worker_id)
            if item is None:
                return claimed
            await work.ack(item.id, environment_id=environment_id)
            claimed.append(item.id)


async def poll_and_ack_raw(base_url: str, environment_id: str, key: str, worker_id: str) -> list[str]:
    """The same loop over plain aiohttp: what the emulator sustains without the SDK's client overhead."""
    claimed: list[str] = []
    headers = {"Authorization": f"Bearer {key}", "Anthropic-Worker-ID": worker_id}
    work = f"/v1/environments/{environment_id}/work"
    async with aiohttp.ClientSession(base_url=base_url, headers=headers) as http:
        while True:
            async with http.get(f"{work}/poll") as response:
                item = await response.json()
            if item is None:
                return claimed
            async with http.post(f"{work}/{item['id']}/ack") as response:
                response.raise_for_status()
            claimed.append(item["id"])


async def one_round(base_url: str, items: int, pollers: int, *, raw: bool) -> float:
    environment_id, key = await fill_queue(base_url, items)
    poller = poll_and_ack_raw if raw else poll_and_ack
    started = time.perf_counter()
    results = await asyncio.gather(
        *(poller(base_url, environment_id, key, f"bench-{index}") for index in range(pollers))
    )
    elapsed = time.perf_counter() - started
    claimed = [work_id for result in results for work_id in result]
    if len(claimed) != items or len(set(claimed)) != items:
        raise AssertionError(f"claimed {len(claimed)} ({len(set(claimed))} distinct) of {items} items")
    return items / elapsed


async def main(args: argparse.Namespace) -> None:
    serve = emulator_in_process if args.in_process else emulator_process
    async with serve() as base_url:
        # Warm-up: imports, connections.
        await one_round(base_url, min(args.items, 200), args.pollers, raw=args.raw)
        rates = [await one_round(base_url, args.items, args.pollers, raw=args.raw) for _ in range(args.rounds)]
    where = "in-process" if args.in_process else "separate process"
    clients = "raw aiohttp" if args.raw else "SDK"
    print(f"rounds (pairs/s): {', '.join(f'{rate:.0f}' for rate in rates)}")
    print(
        f"poll+ack pairs/s with {args.pollers} concurrent {clients} pollers, {args.items} items, "
        f"emulator in {where}: median {statistics.median(rates):.0f}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--pollers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--in-process", action="store_true", help="serve the emulator on this loop")
    parser.add_argument("--raw", action="store_true", help="poll with plain aiohttp instead of the SDK")
    asyncio.run(main(parser.parse_args()))
