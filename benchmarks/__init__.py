"""Benchmarks of sshwasm (issue 5); run each from the repository root as a module, e.g.
`python3 -m benchmarks.warm_run`. See benchmarks/README.md.

They are a package, run with `-m`, because `array.py` would otherwise shadow the standard
library's `array` module (which `socket` imports) for any script run from this directory.
"""
