"""Engines other than the built-in SSH one (issue 12: `engine: dask`).

Nothing here is imported by `import sshwasm` or by the SSH engine's commands: a pool's
modules (and `distributed`) are imported only by the commands that need them.
"""
