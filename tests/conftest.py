"""Shared fixtures: throwaway workspaces and a way to run the real `forge` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRE_REAL = os.environ.get("FORGE_REQUIRE_REAL") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip when a real component is missing, or fail when CI demands it."""
    if condition:
        return
    if REQUIRE_REAL:
        pytest.fail(f"FORGE_REQUIRE_REAL=1 but {reason}")
    pytest.skip(reason)


def wait_for_port(port: int, proc, *, seconds: float, what: str, output) -> None:
    """Wait until a server started as `proc` accepts connections on 127.0.0.1:`port`;
    fail with `output()` (its log's tail) if it exits or takes longer than `seconds`."""
    import socket
    import time
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{what} did not start on port {port} (exit {proc.poll()}):\n{output()}")
            time.sleep(0.05)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def events(self, path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines()]


class Workspace:
    def __init__(self, root: Path, cache: Path):
        self.root = root
        self.cache = cache
        self.calls = root.parent / f"{root.name}-calls.log"

    def write(self, files: dict[str, str]) -> None:
        for rel, text in files.items():
            p = self.root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(textwrap.dedent(text))

    def forge(self, *args: str, cwd: Path | None = None, env: dict | None = None,
              timeout: float = 120) -> Result:
        e = dict(os.environ)
        e.pop("FORGE_CACHE_DIR", None)
        e.update(env or {})
        argv = [sys.executable, "-m", "forge", *args]
        if args and args[0] in ("build", "test", "query", "explain", "clean", "cache", "graph", "run",
                                "load", "provenance") \
                and "--cache-dir" not in args:
            at = 4 if args[0] == "cache" and len(args) > 1 else 3  # after the (sub)command
            argv[at + 1:at + 1] = ["--cache-dir", str(self.cache)]
        p = subprocess.run(argv, cwd=cwd or self.root, env=e, capture_output=True, text=True,
                           timeout=timeout)
        return Result(p.returncode, p.stdout, p.stderr)

    def build(self, *args: str, **kw) -> Result:
        events = self.root.parent / f"{self.root.name}-events.jsonl"
        r = self.forge("build", *args, "--build-events", str(events), "--progress", "plain", **kw)
        r.event_list = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
        if events.exists():
            events.unlink()
        return r

    def executed(self, r: Result) -> list[str]:
        return sorted(e["label"] for e in r.event_list if e.get("status") == "executed")

    def take_calls(self) -> list[str]:
        """Labels whose commands ran since the last call (commands append to the log)."""
        if not self.calls.exists():
            return []
        lines = sorted(self.calls.read_text().split())
        self.calls.unlink()
        return lines

    def out(self, rel: str) -> str:
        return (self.root / "forge-out" / rel).read_text()


@pytest.fixture
def ws(tmp_path) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "forge.toml").write_text("")
    return Workspace(root, tmp_path / "cache")
