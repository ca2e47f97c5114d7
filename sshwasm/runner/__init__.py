"""sshwasm-exec, the runner: the worker side of sshwasm, a package needing only the stdlib and
wasmtime.

Its modules (intra-package imports are relative, so the same files run as `sshwasm.runner`
on the coordinator's machine and as the installed package on a host):

    protocol   the wire protocol both ends import: frame kinds, framing, the launch spec and
               what every answer may hold (its docstring is the protocol's specification)
    jobdir     the workdir and job directories: trust checks, atomic files, pids, results
    safetar    tar streams in (a job's input) and out (its /output), refusing what could escape
    stream     frames to the coordinator, and a job's output as one stream (attach and poll)
    launch     making a job directory from a launch spec and forking the job's process
    execute    running a module in wasmtime under its limits; writes the job's result
    serve      many launches over one channel, each task a fork of a process with wasmtime
    commands   fetch-output, put-module, cancel, info, and `main`, which runs one command
    prune      prune-runners: after an install, the old versions no process uses removed
    __main__   `python -m sshwasm.runner COMMAND ...`, or `python path/to/runner COMMAND ...`

Importing this package, or its protocol module, imports nothing else: the coordinator reads
the protocol without the runner's machinery, and only execute and serve import wasmtime.

On a host the package is installed by the coordinator (transport.RUNNER_BOOTSTRAP) as
`<workdir>/bin/<version>/sshwasm_exec/`, where the version is protocol.runner_version, a hash
over the package's sorted files: written into a temporary directory, renamed into place
whole, and only then named in `<workdir>/bin/current`, the pointer the bootstrap follows. A
command never sees a half-installed runner, and a runner already running keeps its own
files. Then the new runner removes the versions older than the one it replaced that no
process uses (prune.py: every runner process holds a shared flock on its version's
directory). Python caches the bytecode in the package's __pycache__, which is why this is a
folder and not a zipapp (zip imports write no bytecode).

Hosts may have an older Python than the coordinator: every module keeps to Python 3.9, the
oldest wasmtime-py 50 supports (tests/test_runner.py checks this with vermin). Annotations
are never evaluated, thanks to the __future__ imports.
"""
