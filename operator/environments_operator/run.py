"""``environments-operator run``: start the kopf operator with every handler of this package.

Heavy imports (kopf, the handlers) happen inside ``main`` so that building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                        help="watch this namespace (repeatable; kopf glob patterns allowed)")
    parser.add_argument("--all-namespaces", "-A", action="store_true",
                        help="watch all namespaces (the default when no --namespace is given)")
    parser.add_argument("--standalone", action="store_true",
                        help="do not take part in kopf peering (a single replica)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.add_argument("--liveness", default=None, metavar="URL",
                        help="serve kopf's liveness probe at this URL, e.g. http://0.0.0.0:8080/healthz")


# The HTTP clients log every request at INFO: an idle pool's long-polls alone would be 72 lines a minute.
# They speak only at WARNING and above unless --verbose asks for everything.
REQUEST_LOGGERS = ("httpx", "httpx2", "anthropic")


def quiet_request_loggers(verbose: bool) -> None:
    import logging

    if not verbose:
        for name in REQUEST_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def main(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    import kopf

    from environments_operator import handlers  # noqa: F401  (registers every handler)
    from environments_operator.settings import SettingsError, load_settings

    if args.namespace and args.all_namespaces:
        print("environments-operator run: --namespace and --all-namespaces are exclusive", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"environments-operator run: {exc}", file=sys.stderr)
        return 2
    kopf.configure(verbose=args.verbose, log_format=(
        kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.PLAIN
    ))
    quiet_request_loggers(args.verbose)
    standalone = args.standalone or not settings.peering_name
    asyncio.run(kopf.operator(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=standalone,
        priority=settings.peering_priority,
        peering_name=settings.peering_name or None,
        liveness_endpoint=args.liveness,
    ))
    return 0
