"""The Environments API emulator: the embedded default backend (see ``server``)."""
