"""LinuxKit package build.yml and the git tree hash of a package directory (checked
against real git)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require
from forge.formats.linuxkit import package as lkpkg
from forge.formats.linuxkit.errors import Loc


def test_defaults_are_linuxkits():
    p = lkpkg.load("image: foo\n", "b.yml")
    assert (p.image, p.org, p.tag, p.dockerfile) == ("foo", "linuxkit", "{{.Hash}}", "Dockerfile")
    assert p.arches == ("amd64", "arm64", "riscv64")
    assert (p.network, p.disable_cache, p.config, p.build_args, p.extra_sources) == \
        (False, False, None, {}, ())
    assert lkpkg.reference(p, "ab" * 20) == "linuxkit/foo:" + "ab" * 20


def test_every_field():
    p = lkpkg.load("""\
image: app
org: example
tag: "v1-{{ .Hash }}"
dockerfile: build/Dockerfile
arches: [amd64, arm64]
extra-sources:
  - ../common:common
  - ../vendor/x:/vendor/x/
gitrepo: https://example.com/x.git
network: true
disable-cache: true
disable-content-trust: true
buildArgs:
  - VERSION=1.2
  - EMPTY=
  - EQ=a=b
config:
  capabilities: [CAP_NET_ADMIN]
  binds: ["/var:/var"]
  readonly: true
labels:
  com.example.team: os
depends:
  docker-images:
    target-dir: images
""", "b.yml")
    assert lkpkg.reference(p, "f" * 40) == "example/app:v1-" + "f" * 40
    assert p.dockerfile == "build/Dockerfile" and p.arches == ("amd64", "arm64")
    assert [(s.src, s.dst) for s in p.extra_sources] == [("../common", "/common"),
                                                         ("../vendor/x", "/vendor/x")]
    assert p.extra_sources[1].loc == Loc("b.yml", 8, 5)
    assert p.network and p.disable_cache and p.gitrepo == "https://example.com/x.git"
    assert p.build_args == {"VERSION": "1.2", "EMPTY": "", "EQ": "a=b"}
    assert p.config == {"capabilities": ["CAP_NET_ADMIN"], "binds": ["/var:/var"], "readonly": True}
    assert p.labels == {"com.example.team": "os"}


@pytest.mark.parametrize("text, where, message", [
    ("image: a\nextra-source: [x:y]\n", "b.yml:2:1", "unknown key 'extra-source' in build.yml; "
     "did you mean 'extra-sources'?"),
    ("image: a\nnetwork: yes\n", "b.yml:2:10", "'network' of build.yml must be a boolean; got string \"yes\""),
    ("image: a\narches: amd64\n", "b.yml:2:9", "'arches' of build.yml must be a list of strings"),
    ("image: a\narches: [amd64, x86_64]\n", "b.yml:2:17", "item 2 of 'arches' is 'x86_64'"),
    ("org: a\n", "b.yml:1:1", "build.yml has no 'image'"),
    ("image: a\nextra-sources: [nocolon]\n", "b.yml:2:17", "extra source 'nocolon' is not src:dst"),
    ("image: a\nbuildArgs: [NOVALUE]\n", "b.yml:2:13", "build arg 'NOVALUE' is not KEY=value"),
    ("image: a\nbuildArgs: ['X=@lkt:pkg:../b']\n", "b.yml:2:13", "@lkt: values"),
    ("image: a\nconfig:\n  capabilites: [CAP_X]\n", "b.yml:3:3", "unknown key 'capabilites' in "
     "'config' of build.yml; did you mean 'capabilities'?"),
    ("image: a\nconfig:\n  readonly: 1\n", "b.yml:3:13", "must be a boolean"),
    ("image: a\ntag: '{{.Commit}}'\n", "b.yml:2:6", "know only {{.Hash}}"),
    ("image: a\ndepends:\n  docker-images:\n    list: [x@sha256:00]\n", "b.yml:3:3",
     "depends.docker-images"),
    ("image: [a\n", "b.yml:2:1", "YAML syntax error"),
    ("", "b.yml", "build.yml is empty"),
])
def test_errors_name_the_line(text, where, message):
    with pytest.raises(lkpkg.PackageError) as e:
        lkpkg.load(text, "b.yml")
    assert str(e.value.where) == where, str(e.value)
    assert message in e.value.message, e.value.message
    # how to fix it: a hint, or the close name in the message ("did you mean")
    assert e.value.hint or "did you mean" in message or "must be" in message


def test_tag_templates():
    assert lkpkg.render_tag("{{.Hash}}", "abc") == "abc"
    assert lkpkg.render_tag("{{- .Hash -}}-x", "abc") == "abc-x"
    assert lkpkg.render_tag("fixed", "abc") == "fixed"
    assert lkpkg.reference(lkpkg.load("image: a\ntag: ''\n", "b"), "abc") == "linuxkit/a:latest"
    with pytest.raises(lkpkg.PackageError, match="unclosed"):
        lkpkg.render_tag("{{.Hash", "abc")


def test_hash_with_extra_sources_is_linuxkits():
    # pkglib.go: sha1 over the hex of the package tree followed by each source's
    assert lkpkg.package_hash("a" * 40) == "a" * 40
    assert lkpkg.package_hash("a" * 40, ["b" * 40, "c" * 40]) == \
        hashlib.sha1(("a" * 40 + "b" * 40 + "c" * 40).encode()).hexdigest()


def _entries(base: Path):
    out = []
    for dp, _, names in os.walk(base):
        for n in names:
            p = Path(dp) / n
            mode = lkpkg.git_mode(p.lstat().st_mode)
            data = os.readlink(p).encode() if mode == lkpkg.SYMLINK else p.read_bytes()
            out.append((p.relative_to(base).as_posix(), mode, data))
    return out


def test_tree_id_is_gits(tmp_path):
    require(shutil.which("git") is not None, "git is not installed")
    pkg = tmp_path / "repo" / "pkg" / "a"
    # git sorts a tree's names as if directories ended in '/': sub.txt < sub/ < sub-x/ fails
    # a plain sort; an empty directory is not recorded; only the owner's x bit counts.
    for rel, data in {"sub/deeper/y": b"y", "sub-x/z": b"z\n", "sub.txt": b"", "sub0": b"0",
                      "run.sh": b"#!/bin/sh\n", "é ü.txt": "ünïcode\n".encode(),
                      "bin/data": bytes(range(256))}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_bytes(data)
    (pkg / "run.sh").chmod(0o744)
    (pkg / "bin/data").chmod(0o654)  # group/other x: still a plain file for git
    (pkg / "empty").mkdir()
    os.symlink("sub/deeper/y", pkg / "link")
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.email=t@e", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    line = subprocess.run(git + ["ls-tree", "HEAD", "--", "pkg/a"], check=True,
                          capture_output=True, text=True).stdout
    assert line.split()[2] == lkpkg.tree_id(_entries(pkg))
    blob = subprocess.run(git + ["ls-tree", "HEAD", "--", "pkg/a/run.sh"], check=True,
                          capture_output=True, text=True).stdout
    assert blob.split()[:3] == ["100755", "blob", lkpkg.blob_id(b"#!/bin/sh\n")]
