"""Allows ``python -m environments_operator``."""

from environments_operator.cli import main

raise SystemExit(main())
