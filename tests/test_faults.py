"""Faults the machine causes, survived: a cache on a full filesystem. (Killed builds are in
test_robustness.py; registry and mirror faults in tests/formats/registry/; bench/faults
runs the long versions and counts them.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import Workspace, require

pytestmark = pytest.mark.real  # a real, small filesystem: tmpfs mounted with a size limit


@pytest.fixture
def small_fs(tmp_path):
    """A 6 MiB tmpfs; yields its mount point."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    require(p.returncode == 0, f"cannot mount a tmpfs (needs root): {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _blobs_match_their_names(cache: Path) -> int:
    from forge.digest import digest_file
    n = 0
    for blob in (cache / "cas").glob("*/*"):
        assert digest_file(blob) == blob.name.split(".")[0], blob
        n += 1
    return n


def test_a_full_cache_filesystem_is_a_clear_error_and_leaves_nothing_half_written(small_fs, tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "forge.toml").write_text("")
    ws = Workspace(root, small_fs / "cache")
    ws.write({"p/BUILD": '''
        genrule(name = "mid", outs = ["mid.bin"], cmd = "head -c 1500000 /dev/zero | tr '\\\\0' m > $@")
        genrule(name = "big", srcs = [":mid"], outs = ["big.bin"], cmd = "cat $< $< > $@")
        '''})
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (3 << 20))  # what someone else keeps on that filesystem
    r = ws.build("//p:big")
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    assert f"no space left on the filesystem of {small_fs / 'cache'}" in r.err, r.err
    assert "the action had written" in r.err and "forge cache gc" in r.err
    assert not [p for p in (small_fs / "cache/tmp").iterdir() if p.name != "procs"]
    assert _blobs_match_their_names(small_fs / "cache") >= 1  # mid.bin made it, whole
    filler.unlink()  # space freed: the next build finishes the work
    r = ws.build("//p:big")
    assert r.code == 0, r.err
    assert (root / "forge-out/p/big.bin").read_bytes() == b"m" * 3000000
    assert _blobs_match_their_names(small_fs / "cache") >= 2
    assert "1 executed, 1 cached" in r.err


def test_forge_out_on_a_full_filesystem(small_fs, tmp_path):
    """The cache has room but forge-out/ (another filesystem: outputs are copied) has not."""
    ws = Workspace(small_fs / "ws", tmp_path / "cache")
    ws.root.mkdir()
    (ws.root / "forge.toml").write_text("")
    ws.write({"p/BUILD": 'genrule(name = "big", outs = ["big.bin"], cmd = "head -c 8000000 /dev/urandom > $@")\n'})
    r = ws.build("//p:big")
    assert r.code == 1, r.err
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    assert "no space left on the filesystem of" in r.err and str(small_fs / "ws") in r.err, r.err
    assert not list((small_fs / "ws").rglob("*.forge-tmp-*"))
