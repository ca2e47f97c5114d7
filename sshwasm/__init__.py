"""sshwasm: run WebAssembly jobs on the machines you can already reach over SSH."""

__version__ = "0.1.0"
