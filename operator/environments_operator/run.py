"""``environments-operator run``: start the kopf operator with every handler of this package.

Before kopf starts, a preflight checks what would otherwise end in retry loops of tracebacks, and
exits within seconds with one line that names the problem and what to do:

| exit | problem |
| --- | --- |
| 2 | bad arguments or settings |
| 3 | no usable Kubernetes configuration (no kubeconfig, no in-cluster service account) |
| 4 | the API server cannot be reached, or refuses the operator's credentials |
| 5 | the CRDs are not installed |

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
    parser.add_argument("--log-format", choices=("plain", "json"), default=None,
                        help="log line format (default: ENVIRONMENTS_OPERATOR_LOG_FORMAT, else plain); json is one "
                             "object per line, for log pipelines")
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


def quiet_bookkeeping_lines(verbose: bool, handler_names: tuple[str, ...]) -> None:
    """Hide kopf's "Handler 'x' succeeded." lines of per-event bookkeeping handlers unless --verbose."""
    import logging
    import re

    if verbose:
        return
    names = "|".join(map(re.escape, handler_names))
    pattern = re.compile(rf"^(Handler|Indexer) '({names})' succeeded\.$")

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not pattern.match(record.getMessage())

    logging.getLogger("kopf.objects").addFilter(keep)


EXIT_USAGE, EXIT_NO_CONFIG, EXIT_UNREACHABLE, EXIT_NO_CRDS = 2, 3, 4, 5
PREFLIGHT_TIMEOUT_SECONDS = 5.0


class PreflightError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def preflight() -> None:
    """Raise ``PreflightError`` unless the cluster is usable: configuration, API server, CRDs."""
    import kubernetes
    import urllib3

    from environments_operator.adapters.kube import load_configuration
    from environments_operator.domain.common import GROUP, VERSION
    from environments_operator.domain.environment import PLURAL as ENVIRONMENTS
    from environments_operator.domain.workerpool import PLURAL as WORKER_POOLS

    try:
        configuration = load_configuration()
    except (kubernetes.config.ConfigException, OSError) as exc:
        raise PreflightError(EXIT_NO_CONFIG, (
            f"no usable Kubernetes configuration ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): "
            "set KUBECONFIG or a current context in ~/.kube/config, or run in a pod with a service account")) from None
    configuration.retries = False
    host = configuration.host
    with kubernetes.client.ApiClient(configuration) as client:
        try:
            resources = kubernetes.client.CustomObjectsApi(client).get_api_resources(
                GROUP, VERSION, _request_timeout=PREFLIGHT_TIMEOUT_SECONDS)
        except kubernetes.client.exceptions.ApiException as exc:
            if exc.status == 404:
                raise PreflightError(EXIT_NO_CRDS, (
                    f"the API server at {host} serves no {GROUP}/{VERSION}: the CRDs are not installed; "
                    "install them with 'kubectl apply -f crds/' (or the Helm chart)")) from None
            if exc.status in (401, 403):
                raise PreflightError(EXIT_UNREACHABLE, (
                    f"the API server at {host} refused the operator's credentials ({exc.status} {exc.reason}): "
                    "check the kube context's user, or the service account's RBAC")) from None
            raise PreflightError(EXIT_UNREACHABLE, (
                f"the API server at {host} answered {exc.status} {exc.reason}; is it healthy?")) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            reason = str(getattr(exc, "reason", None) or exc).split("): ")[-1]  # e.g. [Errno 111] Connection refused
            raise PreflightError(EXIT_UNREACHABLE, (
                f"cannot reach the Kubernetes API server at {host} ({reason}): check the kube context and the "
                "network")) from None
    served = {resource.name for resource in resources.resources or []}
    missing = sorted({ENVIRONMENTS, WORKER_POOLS} - served)
    if missing:
        raise PreflightError(EXIT_NO_CRDS, (
            f"the API server at {host} serves {GROUP}/{VERSION} without {', '.join(missing)}: the CRDs are not "
            "all installed; install them with 'kubectl apply -f crds/' (or the Helm chart)"))


def main(args: argparse.Namespace) -> int:
    import asyncio
    import sys

    from environments_operator.settings import SettingsError, load_settings

    if args.namespace and args.all_namespaces:
        print("environments-operator run: --namespace and --all-namespaces are exclusive", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"environments-operator run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        preflight()
    except PreflightError as exc:
        print(f"environments-operator run: {exc}", file=sys.stderr)
        return exc.code

    # Only now the heavy imports (kopf, the SDK): a start-up error above is reported within a second.
    import kopf

    from environments_operator import handlers  # registers every handler
    log_format = args.log_format or settings.log_format
    kopf.configure(verbose=args.verbose, log_format=(
        kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.PLAIN
    ))
    quiet_request_loggers(args.verbose)
    quiet_bookkeeping_lines(args.verbose, handlers.workerpool.BOOKKEEPING_HANDLERS)
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
