"""environments-operator: a kopf operator for the Environments API of Claude Managed Agents.

Layers (enforced by import-linter, see pyproject): ``handlers`` -> ``adapters`` -> ``domain``.
``emulator`` is a standalone aiohttp server; ``worker`` is the in-pod runner; ``cli`` dispatches.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("environments-operator")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
