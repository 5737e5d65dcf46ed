"""SLSA provenance: the statement's schema checked with in-toto-attestation (the in-toto
project's own protobuf types), every subject's digest recomputed, the external inputs
found through the action graph, the git state, and two builds of one commit giving the
same statement apart from the run's metadata. RedisOS's: every .deb listed is fetched
again from the URL given and hashed."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require
from test_redisos import redisos  # noqa: F401  (the module's RedisOS build, a fixture)

from forge.formats.provenance import slsa


def check_schema(statement: dict) -> None:
    """Raise unless `statement` is an in-toto Statement v1 holding SLSA provenance v1."""
    pytest.importorskip("in_toto_attestation", reason="in-toto-attestation is a test "
                        "dependency (pip install -e .[test])")
    from google.protobuf import json_format
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
    from in_toto_attestation.v1.statement import Statement
    pb = json_format.ParseDict(statement, statement_pb2.Statement())  # unknown fields refused
    Statement.copy_from_pb(pb).validate()
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    prov = json_format.ParseDict(statement["predicate"], provenance_pb2.Provenance())
    assert prov.build_definition.build_type and prov.run_details.builder.id
    for dep in prov.build_definition.resolved_dependencies:
        ResourceDescriptor.copy_from_pb(dep).validate()


def _statement(**kw) -> dict:
    base = dict(subjects=[slsa.descriptor(name="a", digest={"sha256": "0" * 64})],
                external={"target": "//:a"}, internal={}, dependencies=[],
                builder_id=slsa.DEFAULT_BUILDER, builder_version={"forge": "0"},
                invocation_id="x", started=0, finished=1)
    return slsa.statement(**{**base, **kw})


def test_statement_passes_the_in_toto_schema():
    check_schema(_statement(dependencies=[slsa.descriptor(uri="http://h/x", digest={"sha256": "1" * 64})]))


def test_the_schema_check_is_not_vacuous():
    bad = _statement()
    bad["predicate"]["buildDefinition"]["buildTypo"] = bad["predicate"]["buildDefinition"].pop("buildType")
    with pytest.raises(Exception):
        check_schema(bad)
    with pytest.raises(ValueError):
        check_schema(_statement(subjects=[]))


def test_dependencies_are_merged_and_sorted():
    d = slsa.descriptor(name="b", uri="u2", digest={"sha256": "2" * 64})
    e = slsa.descriptor(name="a", uri="u1", digest={"sha256": "1" * 64})
    st = _statement(dependencies=[d, e, d])
    assert st["predicate"]["buildDefinition"]["resolvedDependencies"] == [e, d]


# --- a workspace built for real ---------------------------------------------------------

BUILD = """
http_file(name = "data", url = "{url}", sha256 = "{sha}")
genrule(name = "gen", srcs = [":data", "msg.txt"], outs = ["gen.txt"],
        cmd = "cat $(SRCS) > $@")
"""


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def gws(ws, tmp_path):
    require(shutil.which("git") is not None, "git is not installed")
    served = tmp_path / "served.bin"
    served.write_bytes(b"from outside\n")
    sha = hashlib.sha256(served.read_bytes()).hexdigest()
    ws.write({"BUILD": BUILD.format(url=served.as_uri(), sha=sha), "msg.txt": "hello\n",
              ".gitignore": "forge-out/\n"})
    _git(ws.root, "init", "-q")
    _git(ws.root, "add", "-A")
    _git(ws.root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    ws.served, ws.sha = served, sha
    return ws


def _verify_subjects(root: Path, st: dict) -> None:
    assert st["subject"]
    for s in st["subject"]:
        path = root / "forge-out" / s["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["digest"]["sha256"], s["name"]


def test_build_writes_provenance_of_each_named_target(gws):
    r = gws.build("//:gen")
    assert r.code == 0, r.err
    st = json.loads((gws.root / "forge-out/gen.provenance.json").read_text())
    check_schema(st)
    _verify_subjects(gws.root, st)
    assert [s["name"] for s in st["subject"]] == ["gen.txt"]
    bd = st["predicate"]["buildDefinition"]
    assert bd["externalParameters"]["target"] == "//:gen"
    head = _git(gws.root, "rev-parse", "HEAD")
    assert bd["externalParameters"]["source"] == {"gitCommit": head, "dirty": False}
    assert bd["externalParameters"]["configFiles"]["forge.toml"]["sha256"] == \
        hashlib.sha256((gws.root / "forge.toml").read_bytes()).hexdigest()
    deps = bd["resolvedDependencies"]
    # the http_file, reached through the genrule that reads it
    assert {"name": "served.bin", "uri": gws.served.as_uri(), "digest": {"sha256": gws.sha}} in deps
    assert {"name": "workspace", "digest": {"gitCommit": head}} in deps
    run = st["predicate"]["runDetails"]
    assert run["builder"]["id"] == slsa.DEFAULT_BUILDER
    assert run["metadata"]["invocationId"]


def test_two_builds_of_one_commit_differ_in_run_metadata_only(gws):
    assert gws.build("//:gen").code == 0
    one = json.loads((gws.root / "forge-out/gen.provenance.json").read_text())
    assert gws.forge("clean").code == 0
    assert gws.build("//:gen").code == 0
    two = json.loads((gws.root / "forge-out/gen.provenance.json").read_text())
    assert one["predicate"]["runDetails"]["metadata"]["invocationId"] != \
        two["predicate"]["runDetails"]["metadata"]["invocationId"]
    for st in (one, two):
        del st["predicate"]["runDetails"]["metadata"]
    assert one == two


def test_forge_provenance_prints_it_and_sees_a_dirty_tree(gws):
    (gws.root / "msg.txt").write_text("changed\n")
    r = gws.forge("provenance", "//:gen", "--cache-dir", str(gws.cache))
    assert r.code == 0, r.err
    st = json.loads(r.out)
    check_schema(st)
    _verify_subjects(gws.root, st)
    assert st["predicate"]["buildDefinition"]["externalParameters"]["source"]["dirty"] is True
    assert json.loads((gws.root / "forge-out/gen.provenance.json").read_text()) == st


def test_builder_id_comes_from_forge_toml(gws):
    (gws.root / "forge.toml").write_text('[provenance]\nbuilder_id = "https://ci.invalid/runner"\n')
    r = gws.forge("provenance", "//:gen", "--cache-dir", str(gws.cache))
    assert r.code == 0, r.err
    assert json.loads(r.out)["predicate"]["runDetails"]["builder"]["id"] == "https://ci.invalid/runner"


def test_forge_provenance_of_a_pattern_is_a_usage_error(gws):
    gws.write({"sub/BUILD": 'genrule(name = "a", outs = ["a.txt"], cmd = "echo a > $@")\n'
                            'genrule(name = "b", outs = ["b.txt"], cmd = "echo b > $@")\n'})
    r = gws.forge("provenance", "//sub/...", "--cache-dir", str(gws.cache))
    assert r.code == 2 and "takes one target" in r.err, r.err
    assert not (gws.root / "forge-out/sub").exists()  # refused before building anything


# --- RedisOS ----------------------------------------------------------------------------

@pytest.mark.real
def test_redisos_provenance_lists_what_came_from_the_mirror(redisos):
    w = redisos
    st = json.loads((w.root / "forge-out/images/redisos.provenance.json").read_text())
    check_schema(st)
    _verify_subjects(w.root, st)
    names = {s["name"] for s in st["subject"]}
    assert {"images/redisos.iso", "images/redisos-initrd.img", "images/redisos.sbom.spdx.json"} <= names
    deps = st["predicate"]["buildDefinition"]["resolvedDependencies"]
    debs = [d for d in deps if d.get("uri", "").endswith(".deb")]
    # every package of both Debian trees, and the kernel package
    inventories = [json.loads(p.read_text())["packages"]
                   for p in (w.root / "forge-out/images").rglob("*.debs.json")]
    listed = {d["digest"]["sha256"] for d in debs}
    for inv in inventories:
        assert {r["sha256"] for r in inv} <= listed
    kernel = next((w.root / "forge-out/images/kernel").glob("*.deb"))
    assert hashlib.sha256(kernel.read_bytes()).hexdigest() in listed
    assert any(d["name"].endswith("/InRelease") for d in deps)
    assert any(d["name"].endswith("/Packages") for d in deps)
    # the URLs are right: the smallest packages fetched again hash to what is listed
    from forge.formats.http.client import HttpClient  # the one HTTP client forge has
    client = HttpClient()
    by_size = sorted(debs, key=lambda d: next((r["size"] for inv in inventories for r in inv
                                                if r["sha256"] == d["digest"]["sha256"]), 1 << 40))
    for d in by_size[:3]:
        data = client.get(d["uri"])
        assert hashlib.sha256(data).hexdigest() == d["digest"]["sha256"], d["uri"]


def test_digest_memo_rehashes_a_changed_file(tmp_path):
    import os
    from forge.provenance import DigestMemo, subjects
    (tmp_path / "forge-out").mkdir()
    f = tmp_path / "forge-out" / "a.bin"
    f.write_bytes(b"one")
    memo = DigestMemo(tmp_path / "memo.json")
    first = subjects(tmp_path, ["forge-out/a.bin"], memo)
    memo.save()
    f.write_bytes(b"two")  # same size, same inode
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    again = subjects(tmp_path, ["forge-out/a.bin"], DigestMemo(tmp_path / "memo.json"))
    assert first[0]["digest"]["sha256"] == hashlib.sha256(b"one").hexdigest()
    assert again[0]["digest"]["sha256"] == hashlib.sha256(b"two").hexdigest()
