"""`python -m sshwasm.mux --socket PATH`: the connection process (see sshwasm.mux)."""

from __future__ import annotations

import sys

from .server import main

sys.exit(main(sys.argv[1:]))
