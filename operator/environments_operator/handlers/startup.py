"""Operator start-up and shutdown: kopf settings, operator settings, the shared Kubernetes client, metrics.

What is built here is put on kopf's operator-wide ``memo`` (every object's memo is a copy of it):
``memo.settings`` (``OperatorSettings``) and ``memo.kube`` (``KubeClient``). Controllers add their own
start-up handlers for what only they need.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from environments_operator.adapters.kube import KubeClient
from environments_operator.domain.common import GROUP
from environments_operator.settings import load_settings

FINALIZER = f"{GROUP}/finalizer"


def apply_kopf_settings(settings: kopf.OperatorSettings) -> None:
    """kopf settings that the apiserver's rules and our security promises require.

    Progress and diff-base live in annotations, not in ``status.kopf``: a real apiserver prunes every
    status field the CRD does not declare, which would make kopf lose its place on every handler retry.
    Posting stays enabled, or ``kopf.event`` would post nothing; kopf's log-to-Event posting
    (``loggers``) is off, because handler logs can carry API error texts: the controllers post the
    Events they mean to post.
    """
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.enabled = True
    settings.posting.loggers = False
    # Reconnect watches well before load balancers cut idle streams, and never hang on a dead one.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60


@kopf.on.startup()
async def start(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger | logging.LoggerAdapter[Any], **_: Any
) -> None:
    apply_kopf_settings(settings)
    memo.settings = load_settings()
    memo.kube = KubeClient()
    if memo.settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(memo.settings.metrics_port)
    logger.info("operator settings: %r", memo.settings)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    kube = getattr(memo, "kube", None)
    if kube is not None:
        kube.close()
