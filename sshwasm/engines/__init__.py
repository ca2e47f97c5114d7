"""Engines other than the built-in SSH one (issue 12: `engine: dask`).

Nothing here is imported by `import sshwasm` or by the SSH engine's commands: a pool's
modules (and `distributed`) are imported only by the commands that need them.
"""

# The `distributed` every member of a pool runs: pinned, as in pyproject.toml's `dask` extra
# (a test holds the two together); `hosts install` installs it on the hosts of a dask cluster.
DISTRIBUTED_VERSION = "2026.8.0"
