"""Builds with --remote-executor against the real thing: PostgreSQL, BuildGrid's
scheduler and `forge worker` processes on loopback (tests/buildgrid_exec_fixture.py).
Where each action ran comes from the build events (`ran_on`), which name the worker."""

from __future__ import annotations

import json
import threading
import time

import pytest

from buildgrid_exec_fixture import exec_grid, start_worker, wait_until  # noqa: F401 (fixture)
from test_http import make

pytestmark = pytest.mark.real

N = 120  # genrules in the big graph


def chain_graph(n: int = N) -> dict[str, str]:
    """n genrules: 20 roots from sources, each later one reading an earlier one, so the
    graph has depth and fan-in; the bytes depend on every input."""
    lines = []
    for i in range(n):
        if i < 20:
            lines.append(f'genrule(name = "g{i}", srcs = ["s{i % 5}.txt"], outs = ["g{i}.txt"], '
                         f'cmd = "(cat $<; echo {i}; sha256sum $<) > $@")')
        else:
            lines.append(f'genrule(name = "g{i}", srcs = [":g{i - 20}", ":g{i // 2}"], '
                         f'outs = ["g{i}.txt"], cmd = "(cat $(SRCS) | sha256sum; echo {i}) > $@")')
    files = {"forge.toml": "", "big/BUILD": "\n".join(lines) + "\n"}
    for k in range(5):
        files[f"big/s{k}.txt"] = f"source {k}\n" * (k + 1)
    return files


def outs(ws, n: int = N) -> dict[str, bytes]:
    return {i: (ws.root / f"forge-out/big/g{i}.txt").read_bytes() for i in range(n)}


def ran_on(r) -> list[str]:
    return [e.get("ran_on", "") for e in r.event_list if e["type"] == "action"]


def rex(grid, *more):
    return ("--remote-executor", grid.url, "--remote-instance-name", grid.instance, *more)


DOCKER = {"forge.toml": "[remote]\nqueue_timeout = 4\n", "d/BUILD": '''
genrule(name = "needs_docker", outs = ["d.txt"], cmd = "echo docker > $@",
        exec_properties = {"docker": "1"})
'''}


def test_an_action_no_worker_can_take_runs_here(tmp_path, exec_grid):
    ws = make(tmp_path, "a", DOCKER)
    r = ws.build("//...", *rex(exec_grid))
    assert r.code == 0, r.err
    assert ran_on(r) == ["local"], r.err
    assert "no worker started it within 4 s" in r.err and "running it here" in r.err
    assert (ws.root / "forge-out/d/d.txt").read_text() == "docker\n"


def test_an_action_no_worker_can_take_fails_clearly_without_fallback(tmp_path, exec_grid):
    ws = make(tmp_path, "a", DOCKER)
    r = ws.build("//...", *rex(exec_grid, "--no-remote-local-fallback"))
    assert r.code == 1, r.err
    assert "no worker started it within 4 s" in r.err
    assert "platform properties" in r.err and "internal error" not in r.err
    assert not (ws.root / "forge-out/d/d.txt").exists()
