"""Probing a booting VM: is its service answering, has its console printed a line?

A `Probe` is a check that returns an answer, or None while the guest is not ready. Network
errors count as "not ready": under QEMU's user networking the host side accepts a
connection before anything listens in the guest, then closes or resets it, so an empty
reply or a reset is normal during boot. `wait_for` polls every 0.25 s until the probe
answers, the deadline passes (BootTimeout) or QEMU exits (VMExited); both errors carry the
last 40 lines of the serial console, which is usually where the reason is.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Pattern
from forge.formats.vm.errors import BootTimeout, VMExited

POLL = 0.25
TAIL_LINES = 40
_ANSI = re.compile(r"\x1b(\[[0-9;?=]*[A-Za-z]|[()][A-Z0-9]|[=>c])")
# Reset, clear screen, cursor to a position: what follows starts a fresh line on a screen.
_FRESH = re.compile(r"\x1b(c|\[[0-9;]*[JH])")


def console_tail(path: Path | None, lines: int = TAIL_LINES) -> str:
    """The last non-blank lines of a serial log, without terminal escape sequences."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    kept = [line for line in _plain(text).split("\n") if line.strip()]
    return "\n".join(kept[-lines:])


def _plain(text: str) -> str:
    """Console output as lines a reader would see: terminal escapes removed, those that
    clear the screen or move the cursor taken as line breaks (the boot loader's last line
    can lose its newline when the kernel takes the serial port over, and the next thing
    printed comes after a screen reset), CR LF as LF."""
    text = _ANSI.sub("", _FRESH.sub("\n", text))
    return text.replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class Probe:
    what: str                                  # for messages: "redis PING on 127.0.0.1:5555"
    check: Callable[[Path | None], object]     # given the console log; None: not yet

    def __call__(self, console: Path | None = None) -> object:
        try:
            answer = self.check(console)
        except OSError:  # refused, reset, timed out: the guest is still booting
            return None
        return None if answer is None or answer is False else answer


def tcp_expect(port: int, send: bytes, expect: bytes | str | Pattern[bytes], *,
               host: str = "127.0.0.1", io_timeout: float = 2.0) -> Probe:
    """Connect, send `send`, read until the reply contains `expect` (bytes) or matches it
    (a regular expression, str or compiled, over bytes). Answer: the reply, or the match."""
    pattern = re.compile(expect.encode() if isinstance(expect, str) else expect) \
        if not isinstance(expect, bytes) else None

    def check(_console):
        with socket.create_connection((host, port), timeout=io_timeout) as s:
            if send:
                s.sendall(send)
            data = b""
            while True:
                if pattern is not None:
                    if m := pattern.search(data):
                        return m
                elif expect in data:
                    return data
                chunk = s.recv(65536)
                if not chunk:
                    return None
                data += chunk

    shown = pattern.pattern if pattern is not None else expect
    return Probe(f"{shown!r} from {host}:{port}", check)


def redis_ping(host: str, port: int) -> Probe:
    """A Redis server answering PING (RESP: `*1 $4 PING` -> `+PONG`)."""
    p = tcp_expect(port, b"*1\r\n$4\r\nPING\r\n", b"+PONG", host=host)
    return Probe(f"redis PING on {host}:{port}", p.check)


def console_regex(pattern: str | Pattern[str]) -> Probe:
    """A line on the serial console matching `pattern` (re.MULTILINE, over the text without
    terminal escapes). Answer: the match."""
    rx = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern

    def check(console):
        if console is None:
            raise ValueError("console_regex needs a VM whose console goes to a log file")
        return rx.search(_plain(console.read_bytes().decode("utf-8", "replace")))

    return Probe(f"console line matching {rx.pattern!r}", check)


def wait_for(probe: Probe, timeout: float, *, console: Path | None = None,
             proc: subprocess.Popen | None = None,
             qemu_output: Callable[[], str] | None = None) -> object:
    """Poll `probe` every 0.25 s; its answer, or BootTimeout after `timeout` seconds, or
    VMExited as soon as `proc` has ended without the probe answering."""
    deadline = time.monotonic() + timeout
    while True:
        if (answer := probe(console)) is not None:
            return answer
        if proc is not None and proc.poll() is not None:
            # What the guest printed just before powering off still counts.
            if (answer := probe(console)) is not None:
                return answer
            tail = console_tail(console)
            out = qemu_output() if qemu_output else ""
            raise VMExited(f"QEMU exited with status {proc.returncode} before "
                           f"{probe.what} answered"
                           + (f"\nQEMU said:\n{_indent(out)}" if out else "")
                           + _tail_text(tail), proc.returncode, tail)
        if time.monotonic() >= deadline:
            tail = console_tail(console)
            raise BootTimeout(f"no {probe.what} after {timeout:g} s" + _tail_text(tail), tail)
        time.sleep(POLL)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _tail_text(tail: str) -> str:
    return f"\nlast console lines:\n{_indent(tail)}" if tail else "\n(the console is empty)"
