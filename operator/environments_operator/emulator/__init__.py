"""The Environments API emulator: the embedded default backend.

``server`` serves the API (and documents every decision the reference leaves open), ``state`` holds
its semantics, ``validation`` and ``faults`` parse client input, ``cli`` is the console command.
Import ``environments_operator.emulator.server.EmulatorServer`` to run it in-process; this package
module stays free of imports so that the console script's parser stays cheap.
"""
