"""A spare channel per connection: a session opened ahead of the next command.

Opening a session costs sshd a fork, the login, and the user's shell starting (about as much
as the rest of a warm job on loopback, benchmarks/warm_run.py); a spare pays that before the
command is known. It runs a POSIX shell that reads one line, the command, and runs it with
`eval`: the same command text sshd would have handed to the login shell, so it is parsed the
same way and no word is interpreted that a direct channel would not interpret. The rest of
the channel's stdin is the command's (`read` takes one byte at a time from a pipe).

A command line holds newlines only inside single quotes (shlex.quote puts every word with
one there); each is sent as `'"$NL"'` (close the quote, a newline from $NL, reopen it).
A command with a newline anywhere else (none of ours) is never given to a spare.
"""

from __future__ import annotations

import shlex

# Exit status of a spare whose command line never came (the channel was closed unused).
NO_COMMAND_EXIT = 97
_SCRIPT = (
    'NL="$(printf \'\\nx\')"; NL="${NL%x}"; '
    f'IFS= read -r line || exit {NO_COMMAND_EXIT}; eval "$line"'
)
# What the spare channel runs (through the login shell, as every command does).
SPARE_COMMAND = "exec /bin/sh -c " + shlex.quote(_SCRIPT)


def one_line(command: str) -> str | None:
    """`command` as one line a spare runs exactly as sshd would run `command`; None when
    a newline is outside single quotes (the command must then get its own channel)."""
    out: list[str] = []
    quote: str | None = None  # "'" or '"' while inside such quotes
    escaped = False
    for char in command:
        if char == "\n":
            if quote != "'":
                return None
            out.append("'\"$NL\"'")
            continue
        out.append(char)
        if escaped:
            escaped = False
        elif quote == "'":
            if char == "'":
                quote = None
        elif char == "\\":
            escaped = True
        elif quote == '"':
            if char == '"':
                quote = None
        elif char in "'\"":
            quote = char
    return "".join(out) + "\n"
