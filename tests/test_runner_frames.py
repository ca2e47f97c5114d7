"""Frames leave the runner whole, even when a signal interrupts a write to a slow reader."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from sshwasm.runner.protocol import FrameDecoder

FRAMES = 400
PAYLOAD_BYTES = 64 * 1024 + 9  # like an O/E frame: a 64 KiB chunk behind a short key

# serve's situation: a Python-level SIGCHLD handler (for its wakeup fd), children ending
# all the time, and frames bigger than a pipe's buffer. A write interrupted by SIGCHLD
# after moving part of a frame returns early; the rest must still be sent. (Written through
# sys.stdout.buffer, frames lost bytes here in every run; in serve, about one session in 20.)
WRITER = f"""
import os, signal, sys
from sshwasm.runner.stream import _FrameWriter
signal.signal(signal.SIGCHLD, lambda signum, frame: None)
writer = _FrameWriter(sys.stdout.buffer)
for index in range({FRAMES}):
    if index % 2 == 0 and os.fork() == 0:
        os._exit(0)
    writer.send(b"O", index.to_bytes(4, "big") + bytes([index % 251]) * {PAYLOAD_BYTES - 4})
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
"""


def test_frames_interrupted_by_signals_arrive_whole() -> None:
    writer = subprocess.Popen([sys.executable, "-c", WRITER], stdout=subprocess.PIPE)
    assert writer.stdout is not None
    decoder = FrameDecoder()
    frames: list[tuple[bytes, bytes]] = []
    while data := os.read(writer.stdout.fileno(), 1 << 16):
        frames += decoder.feed(data)
        time.sleep(0.0005)  # a slow reader keeps the pipe full, so writes block and get cut
    assert writer.wait(timeout=60) == 0
    assert decoder.pending == 0
    assert len(frames) == FRAMES
    for index, (kind, payload) in enumerate(frames):
        assert kind == b"O" and len(payload) == PAYLOAD_BYTES
        assert payload == index.to_bytes(4, "big") + bytes([index % 251]) * (PAYLOAD_BYTES - 4)
