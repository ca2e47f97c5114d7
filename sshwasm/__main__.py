"""`python -m sshwasm` (used by `run --detach` to start its background coordinator)."""

from .cli import entry_point

entry_point()
