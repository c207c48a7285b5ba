"""``environments-operator emulator``: serve the Environments API emulator until SIGINT/SIGTERM.

Parses the command line, starts ``server.EmulatorServer``, prints ``listening on http://HOST:PORT``
once the socket is bound, and shuts down cleanly on a signal. Heavy imports (aiohttp) stay inside
``main`` so that building the parser is cheap. It may not print or log credentials.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on; 0 picks a free one (default: 8765)")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accept only this API key (repeatable); without it any non-empty API key is accepted",
    )
    parser.add_argument(
        "--faults",
        metavar="JSON|@FILE",
        help='fault-injection rules to start with, e.g. \'{"faults": [{"route": "work.poll", '
        '"effect": "error", "status": 503, "rate": 0.1}]}\' or @faults.json',
    )
    parser.add_argument(
        "--lease-ttl-seconds",
        type=int,
        default=None,
        metavar="N",
        help="lease TTL for heartbeats that ask for none (default: 90)",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request (access log) and fault")


def _read_faults(value: str) -> object:
    text = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
    return json.loads(text)


def main(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal
    import sys

    from environments_operator.emulator.errors import ApiError
    from environments_operator.emulator.server import EmulatorServer
    from environments_operator.emulator.state import DEFAULT_LEASE_TTL_SECONDS

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    lease_ttl = args.lease_ttl_seconds if args.lease_ttl_seconds is not None else DEFAULT_LEASE_TTL_SECONDS
    if lease_ttl < 1:
        print("environments-operator emulator: --lease-ttl-seconds must be at least 1", file=sys.stderr)
        return 2
    try:
        faults = _read_faults(args.faults) if args.faults else None
        server = EmulatorServer(
            host=args.host,
            port=args.port,
            api_keys=args.api_key,
            faults=faults,
            default_lease_ttl_seconds=lease_ttl,
            access_log=args.verbose,
        )
    except (OSError, ValueError) as error:
        print(f"environments-operator emulator: --faults: {error}", file=sys.stderr)
        return 2
    except ApiError as error:
        print(f"environments-operator emulator: --faults: {error.message}", file=sys.stderr)
        return 2

    async def serve() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await server.start()
        print(f"listening on {server.base_url}", flush=True)
        try:
            await stopping.wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except OSError as error:
        print(f"environments-operator emulator: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    return 0
