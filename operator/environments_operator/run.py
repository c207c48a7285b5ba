"""``environments-operator run``: start the kopf operator. Heavy imports happen inside ``main``."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                        help="watch this namespace (repeatable); glob patterns as in kopf")
    parser.add_argument("--all-namespaces", "-A", action="store_true",
                        help="watch all namespaces (the default when no --namespace is given)")
    parser.add_argument("--standalone", action="store_true",
                        help="do not take part in kopf peering (single replica)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--liveness", default=None, metavar="URL",
                        help="serve kopf's liveness probe at this URL, e.g. http://0.0.0.0:8080/healthz")


def main(args: argparse.Namespace) -> int:
    import sys

    print("environments-operator run: the operator handlers are not implemented yet "
          "(Environment controller and WorkerPool controller are pending)", file=sys.stderr)
    return 3
