"""Run one runner command: `python -m sshwasm.runner COMMAND ...`, or the package's directory
as a script, `python path/to/runner COMMAND ...` (as the tests and another interpreter do)."""

from __future__ import annotations

import sys

if __package__:
    from .commands import main
else:
    # Run as a directory: its files import each other relatively, so load it as the package
    # it is, under the name it has on hosts. Its directory leaves the path: its files are no
    # top-level modules, and no other file beside it is imported.
    import importlib
    import importlib.util
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        del sys.path[0]
    _spec = importlib.util.spec_from_file_location(
        "sshwasm_exec", os.path.join(_here, "__init__.py"), submodule_search_locations=[_here]
    )
    assert _spec is not None and _spec.loader is not None
    _package = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _package
    _spec.loader.exec_module(_package)
    main = importlib.import_module("sshwasm_exec.commands").main

if __name__ == "__main__":
    sys.exit(main())
