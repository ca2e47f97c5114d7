"""The connection process: one per user, holding an SSH connection per host between commands.

Like OpenSSH's ControlMaster/ControlPersist. The first command that needs a host starts it
(detached, `python -m sshwasm.mux`); it listens on a Unix socket (0600, in a 0700 directory
under the user's runtime dir, `paths.runtime_dir`), opens each host's connection with the same
code and host-key checks as a direct one (`transport.SshTransport`), and relays the bytes of
each remote command through the socket. It exits once no command has used it for the
hosts' `connection_persist_s`. Connections are keyed by every SSH setting of the host, so an
edited cluster file never reaches an old address through an old connection.

`wire` is what both ends share (frames, where the socket is, the checks on it), `server` the
process, `spare` the session it opens ahead of each connection's next command, `warm` the
runner `serve` it keeps per connection for single jobs (handed over as L frames), `client`
the transport the CLI uses (`MuxTransport`), which falls back to a direct connection
whenever the process is missing, broken or not trustworthy.
"""
