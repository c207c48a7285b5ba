"""The ``environments-operator`` console script: a thin dispatcher over the subcommand modules.

Each subcommand lives in its own module that exposes ``add_arguments(parser)`` and ``main(args) -> int``;
this module only builds the parser and calls the chosen module. Subcommand modules keep heavy imports
(kopf, aiohttp, the SDK) inside ``main`` so that building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from environments_operator import __version__

# subcommand -> (module implementing it, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("environments_operator.run", "run the operator (kopf) against the current kube context"),
    "emulator": ("environments_operator.emulator.cli", "serve the Environments API emulator"),
    "worker": ("environments_operator.worker", "serve one work item inside a worker pod, then exit"),
    "crds": ("environments_operator.crdgen", "print the CRDs, or write them into a directory"),
    "demo": ("environments_operator.demo", "the whole system on a simulated cluster, serving N sessions"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="environments-operator",
        description="Kubernetes operator for the Environments API of Claude Managed Agents.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    result = module.main(args)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
