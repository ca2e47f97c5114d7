"""Run one runner command: `python -m sshwasm.runner COMMAND ...`, or the package's directory
as a script, `python path/to/runner COMMAND ...` (as the tests and another interpreter do)."""

from __future__ import annotations

import sys

if __package__:
    from .commands import main
else:
    # Run as a directory: its files import each other relatively, so import it as the
    # package it is, from its parent directory, in place of the directory itself.
    import importlib
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[0] = os.path.dirname(_here)
    main = importlib.import_module(os.path.basename(_here) + ".commands").main

if __name__ == "__main__":
    sys.exit(main())
