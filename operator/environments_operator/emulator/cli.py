"""``environments-operator emulator``: command-line entry of the emulator."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)


def main(args: argparse.Namespace) -> int:
    import sys

    print("environments-operator emulator: not implemented yet", file=sys.stderr)
    return 3
