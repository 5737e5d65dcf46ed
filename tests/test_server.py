"""The resident server (FORGE_SERVER=1): same answers, output and exit codes as a
command run in-process, Ctrl-C forwarded, and a stale server replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FORGE = Path(sys.executable).parent / "forge"


@pytest.fixture
def served(ws, tmp_path):
    if not FORGE.exists():
        pytest.skip(f"the forge console script is not installed next to {sys.executable}")
    env = dict(os.environ, FORGE_SERVER="1", XDG_RUNTIME_DIR=str(tmp_path / "run"))
    env.pop("FORGE_CACHE_DIR", None)
    (tmp_path / "run").mkdir()

    def forge(*args, timeout=60):
        p = subprocess.run([str(FORGE), *args, "--cache-dir", str(ws.cache)], cwd=ws.root,
                           env=env, capture_output=True, text=True, timeout=timeout)
        return p
    yield forge, tmp_path / "run"
    for pid in (tmp_path / "run").rglob("*.pid"):
        try:
            os.kill(int(pid.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def wait_for_socket(run_dir: Path) -> None:
    deadline = time.time() + 30
    while not list(run_dir.rglob("*.sock")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(run_dir.rglob("*.sock")), "the server did not start"


def test_served_builds_match_in_process_ones(ws, served):
    forge, run_dir = served
    ws.write({"p/in.txt": "x\n", "p/BUILD": 'genrule(name = "g", srcs = ["in.txt"], outs = ["g.txt"], cmd = "cat $< $< > $@")\n'})
    first = forge("build", "//p:g")  # runs in-process and starts the server
    assert first.returncode == 0, first.stderr
    wait_for_socket(run_dir)
    second = forge("build", "//p:g")
    assert second.returncode == 0, second.stderr
    assert second.stdout == "forge-out/p/g.txt\n"
    assert second.stderr.strip().endswith("0 executed, 1 cached")
    (ws.root / "p/in.txt").write_text("y\n")
    third = forge("build", "//p:g")
    assert third.stderr.strip().endswith("1 executed, 0 cached")
    assert (ws.root / "forge-out/p/g.txt").read_text() == "y\ny\n"
    bad = forge("build", "//p:nope")
    assert bad.returncode == 2 and "no target of //p" in bad.stderr and "Traceback" not in bad.stderr


def test_ctrl_c_reaches_the_served_build(ws, served):
    forge, run_dir = served
    ws.write({"p/BUILD": 'genrule(name = "slow", outs = ["s.txt"], cmd = "sleep 30; echo > $@")\n'
                         'genrule(name = "quick", outs = ["q.txt"], cmd = "echo > $@")\n'})
    assert forge("build", "//p:quick").returncode == 0
    wait_for_socket(run_dir)
    env = dict(os.environ, FORGE_SERVER="1", XDG_RUNTIME_DIR=str(run_dir))
    p = subprocess.Popen([str(FORGE), "build", "//p:slow", "--cache-dir", str(ws.cache)],
                         cwd=ws.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 8, err
    assert forge("build", "//p:quick").stderr.strip().endswith("0 executed, 1 cached")
