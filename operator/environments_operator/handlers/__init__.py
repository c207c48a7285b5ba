"""kopf wiring: thin handlers that parse, decide through ``domain``, act through ``adapters``, and report.

Importing this package registers every handler on kopf's default registry. Each controller module adds
its own import below.
"""

from environments_operator.handlers import (
    environment,  # noqa: F401  (registers handlers on import)
    startup,  # noqa: F401  (registers handlers on import)
    workerpool,  # noqa: F401  (registers handlers on import)
)
