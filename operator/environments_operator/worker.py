"""``environments-operator worker``: serve one work item inside a worker pod, then exit."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None, help="working directory for the agent's tools")
    parser.add_argument("--max-idle", type=float, default=None, metavar="SECONDS",
                        help="exit after this long without activity")


def main(args: argparse.Namespace) -> int:
    import sys

    print("environments-operator worker: not implemented yet", file=sys.stderr)
    return 3
