#!/usr/bin/env python3
"""The hand-made way to run one task: `python runner_baseline.py MODULE.wasm TASK_ID`.

What a user without sshwasm would put on each host for GNU parallel to call over ssh: load
the module with wasmtime (compiling it, no cache), give it `SSHWASM_ARRAY_TASK_ID`, inherit
stdout and stderr, exit with its code. Copied to the host workdir by benchmarks/array.py.
Kept to Python 3.9, like the real runner, since hosts may be older.
"""

from __future__ import annotations

import os
import sys

import wasmtime


def main() -> int:
    """Run the module's `_start` once; return the guest's exit code."""
    module_path, task_id = sys.argv[1], sys.argv[2]
    engine = wasmtime.Engine()
    module = wasmtime.Module.from_file(engine, module_path)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = [os.path.basename(module_path)]
    wasi.env = [("SSHWASM_ARRAY_TASK_ID", task_id)]
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    store.set_wasi(wasi)
    instance = linker.instantiate(store, module)
    try:
        instance.exports(store)["_start"](store)
    except wasmtime.ExitTrap as exc:
        return int(exc.code)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    # Skip interpreter teardown, where wasmtime's threads can panic (see the shared notes).
    os._exit(status)
