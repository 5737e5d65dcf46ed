"""A resident forge process per workspace, so a command does not pay for starting
Python and importing forge every time (opt-in: FORGE_SERVER=1; see forge/launcher.py).

Protocol on a Unix socket: the client sends one JSON line {"argv", "cwd", "env"} together
with its stdin, stdout and stderr file descriptors (SCM_RIGHTS), so the command reads and
writes the client's own terminal or pipes; later it may send {"interrupt": true} (Ctrl-C);
the server answers one JSON line {"exit": code} or {"restart": true} when forge's code
changed since it started (the client then runs the command itself). One command at a
time; the server exits after an idle hour.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

IDLE_SECONDS = 3600


def code_fingerprint(state: Path) -> list[tuple[str, int]]:
    """The mtimes of forge's and the rule families' sources: a server running older code
    than what is installed must not answer."""
    import forge
    from forge.ruleset import installed
    out = [(str(f), f.stat().st_mtime_ns)  # every subpackage: formats/ has several
           for f in sorted(Path(forge.__file__).parent.rglob("*.py"))]
    return out + installed().code_fingerprint(state)


def serve(sock_path: str, root: str | None = None) -> None:
    from forge import cli, uptodate, watch
    from forge.ruleset import installed
    watch.ENABLED = True
    from forge import digest
    digest.MEMO = True  # records read once, then reused while their files are unchanged
    digest.DEFERRED = []  # and written after the command was answered
    from forge import cache
    cache.KEEP_OPEN = True
    if root and os.environ.get("FORGE_WATCH", "1") != "0":
        from forge.workspace import OUT_DIR
        watch.watcher(Path(root), Path(root) / OUT_DIR)  # from now on, changes are seen
    installed().load()  # the point of a server: everything imported once
    import gc
    gc.freeze()  # what is imported lives for good: keep collections from walking it
    state = Path(sock_path).parent
    started = code_fingerprint(state)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    srv.bind(sock_path)
    os.chmod(sock_path, 0o600)
    Path(sock_path[:-5] + ".pid").write_text(str(os.getpid()))
    srv.listen(4)
    srv.settimeout(IDLE_SECONDS)
    main_thread = threading.get_ident()
    while True:
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            break
        with conn:
            msg, fds = _receive(conn)
            if msg is None:
                continue
            if code_fingerprint(state) != started:
                conn.sendall(b'{"restart": true}\n')
                break
            argv = list(msg["argv"])
            if argv[:1] in (["build"], ["test"]):
                uptodate.REQUEST = (tuple(argv), msg["cwd"], tuple(sorted(msg["env"].items())))
            else:
                uptodate.forget()  # clean, cache gc, lock...: what was known may be gone
                uptodate.REQUEST = None
            code = _run(cli, conn, msg, fds, main_thread)
            try:
                conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
            except OSError:
                pass
            digest.run_deferred()
    digest.run_deferred()
    srv.close()
    for f in (sock_path, sock_path[:-5] + ".pid"):
        try:
            os.unlink(f)
        except OSError:
            pass


def _receive(conn):
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            return None, fds
        data += more
    return json.loads(data), fds


def _run(cli, conn, msg: dict, fds: list[int], main_thread: int) -> int:
    saved = [os.dup(i) for i in (0, 1, 2)]
    env = dict(os.environ)
    cwd = os.getcwd()
    done = threading.Event()

    def watch():  # a Ctrl-C on the client becomes a KeyboardInterrupt here
        while not done.is_set():
            try:
                line = conn.recv(4096)
            except OSError:
                return
            if not line:
                if not done.is_set():
                    signal.pthread_kill(main_thread, signal.SIGINT)
                return
            if b"interrupt" in line:
                signal.pthread_kill(main_thread, signal.SIGINT)

    try:
        for i, fd in enumerate(fds[:3]):
            os.dup2(fd, i)
        os.environ.clear()
        os.environ.update(msg["env"])
        os.chdir(msg["cwd"])
        threading.Thread(target=watch, daemon=True).start()
        try:
            return int(cli.main(list(msg["argv"])) or 0)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except KeyboardInterrupt:
            return 8
    finally:
        done.set()
        sys.stdout.flush()
        sys.stderr.flush()
        for i, fd in enumerate(saved):
            os.dup2(fd, i)
            os.close(fd)
        for fd in fds:
            os.close(fd)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
