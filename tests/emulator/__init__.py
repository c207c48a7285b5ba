"""Tests of the Environments API emulator, driven through the official SDK (see conftest.py)."""
