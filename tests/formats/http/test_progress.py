"""The byte progress bar: drawn on a terminal (a real pty here) for large downloads only."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import sys
import termios

from forge.formats.http.client import HttpClient
from http_origin import Origin


def download_on(threshold: int) -> None:
    o = Origin({"/big.bin": b"\0" * (3 << 20)})
    try:
        sink = type("S", (), {"write": lambda self, b: None, "restart": lambda self: None})()
        HttpClient(env={}, progress_threshold=threshold).download(o.url("/big.bin"), sink,
                                                                 label="big.bin")
    finally:
        o.close()


def drawn(monkeypatch, threshold: int, tty: bool) -> str:
    master, slave = pty.openpty()
    # a terminal 100 columns wide: tqdm draws nothing on a pty of the default 0 x 0
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    stream = os.fdopen(slave, "w") if tty else open(os.devnull, "w")
    monkeypatch.setattr(sys, "stderr", stream)
    out = b""
    try:
        download_on(threshold)
        stream.flush()
        while select.select([master], [], [], 0.5)[0]:  # the pty hands bytes over lazily
            out += os.read(master, 1 << 16)
    finally:
        stream.close()
        os.close(master)
    return out.decode(errors="replace")


def test_a_large_download_draws_a_byte_bar_on_a_terminal(monkeypatch):
    out = drawn(monkeypatch, 1 << 20, tty=True)
    assert "big.bin" in out and "3.00M" in out  # the total, in binary units (tqdm's M)


def test_small_downloads_and_non_terminals_draw_nothing(monkeypatch):
    assert drawn(monkeypatch, 16 << 20, tty=True) == ""  # 3 MiB is below the threshold
    assert drawn(monkeypatch, 1 << 20, tty=False) == ""
