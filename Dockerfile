# The one image of environments-operator: `environments-operator run` (the operator), `emulator`
# (the Environments API emulator) and `worker` (one work item per pod, with the SDK's agent toolset).
#
# Build: docker build -t environments-operator:0.1.0 .
#
# Runs as the numeric non-root user 10001 and writes nothing outside /tmp (HOME and TMPDIR point
# there), so it works with readOnlyRootFilesystem when /tmp is an emptyDir, as the Helm chart mounts.

# Python 3.11 as in CI, on Debian 12. Pinned by tag and by the digest of the multi-architecture
# index; bump both together.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---- build: install the package into a virtualenv, exactly as the README and CI do ----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# pyproject.toml names README.md as the long description, so the build needs it too.
COPY pyproject.toml README.md ./
COPY operator/ operator/
# `pip install .` (not editable, no test extra) into a venv; pip compiles the bytecode at install
# time, so nothing needs to be written at run time.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir . \
    && /opt/venv/bin/environments-operator --version

# ---- runtime ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="environments-operator" \
      org.opencontainers.image.description="Kubernetes operator for the Environments API of Claude Managed Agents" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# What the worker's agent toolset needs at run time (anthropic/lib/tools/agent_toolset.py):
# - bash: the `bash` tool runs /bin/bash (already in the base image);
# - ripgrep: the `grep` tool runs the first `rg` on PATH (it falls back to a slow Python walk);
# - git: what agents reach for first in a checkout;
# - tini: PID 1 that forwards signals and reaps the orphans the bash tool leaves behind.
# Versions are Debian 12's; bump them with the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        git=1:2.39.5-0+deb12u3 \
        ripgrep=13.0.0-4+b2 \
        tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin app \
    && install -d -o 10001 -g 10001 -m 0750 /workspace

COPY --from=build /opt/venv /opt/venv

# HOME and TMPDIR on /tmp: the only writable path under readOnlyRootFilesystem (an emptyDir there).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    TMPDIR=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The worker's tools resolve relative paths against the working directory; worker pods mount a
# volume here (or pass --workdir).
WORKDIR /workspace
USER 10001:10001

# Pods choose the command through `args` (e.g. ["environments-operator", "worker"]), which keeps tini
# as PID 1.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["environments-operator", "run"]
