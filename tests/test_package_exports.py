"""`import sshwasm` exports the API lazily from three tables in sshwasm/__init__.py (the
TYPE_CHECKING imports, `_LAZY`, `__all__`): they must agree with each other and with
`sshwasm.api.__all__`, or a name added to the API is missing from the package (or the
reverse) with nothing to say so until a user trips on it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import sshwasm
from sshwasm import api

INIT = Path(sshwasm.__file__)


def type_checking_imports() -> dict[str, str]:
    """Name -> module, from the `if TYPE_CHECKING:` block's `from .X import ...` lines."""
    tree = ast.parse(INIT.read_text())
    (block,) = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
        if node.test.id == "TYPE_CHECKING"
    ]
    names: dict[str, str] = {}
    for statement in block.body:
        if isinstance(statement, ast.ImportFrom) and statement.level == 1:
            assert statement.module is not None
            names.update(dict.fromkeys((alias.name for alias in statement.names), statement.module))
    return names


def test_the_three_export_tables_agree() -> None:
    lazy = sshwasm._LAZY
    assert type_checking_imports() == lazy
    assert sorted(sshwasm.__all__) == sorted([*lazy, "__version__"])
    assert {name for name, module in lazy.items() if module == "api"} == set(api.__all__)


def test_every_exported_name_resolves_to_its_module_object() -> None:
    for name, module in sshwasm._LAZY.items():
        assert getattr(sshwasm, name) is getattr(importlib.import_module(f"sshwasm.{module}"), name)
    assert set(sshwasm.__all__) <= set(dir(sshwasm))
