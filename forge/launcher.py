"""The `forge` command. It hands the command to a resident forge process for this
workspace (forge/server.py), starting one when none answers, so a build costs a socket
round trip instead of starting Python and importing forge. With FORGE_SERVER=0, and
whenever the server cannot serve, it runs the command in this process.

Only the standard library's lightest modules are imported here.
"""

from __future__ import annotations

import os
import sys

SERVED = frozenset({"build", "test", "query", "explain", "graph", "clean", "cache", "load",
                    "lock", "affected"})


def main() -> int:
    argv = sys.argv[1:]
    if os.environ.get("FORGE_SERVER", "1") != "0" and argv and argv[0] in SERVED:
        code = _via_server(argv)
        if code is not None:
            return code
    from forge.cli import main as cli_main
    return cli_main(argv)


def _root(start: str) -> str | None:
    d = start
    while True:
        if os.path.isfile(os.path.join(d, "forge.toml")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def socket_path(root: str) -> str:
    import hashlib
    here = os.path.dirname(os.path.abspath(__file__))
    key = hashlib.sha1(f"{root}\0{here}\0{sys.executable}".encode()).hexdigest()[:16]
    d = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp", f"forge-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return os.path.join(d, f"{key}.sock")


def _via_server(argv: list[str]) -> int | None:
    import json
    import signal
    import socket
    cwd = os.getcwd()
    root = _root(cwd)
    if root is None:
        return None
    try:
        path = socket_path(root)
    except OSError:
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        _spawn(path, root)
        return None  # this command runs here; the next one finds the server
    msg = json.dumps({"argv": argv, "cwd": cwd, "env": dict(os.environ)}).encode() + b"\n"
    socket.send_fds(s, [msg], [0, 1, 2])
    previous = signal.signal(signal.SIGINT, lambda *_: s.sendall(b'{"interrupt": true}\n'))
    try:
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                return None if not reply else 37
            reply += chunk
    finally:
        signal.signal(signal.SIGINT, previous)
        s.close()
    answer = json.loads(reply)
    return None if answer.get("restart") else int(answer["exit"])


def _spawn(path: str, root: str) -> None:
    import subprocess
    try:
        with open(path[:-5] + ".log", "ab") as log:
            subprocess.Popen([sys.executable, "-m", "forge.server", path, root],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, cwd="/")
    except OSError:
        pass  # no server this time: commands keep running in-process
