"""SBOMs: Debian copyright files to SPDX licences, the inventory of real .deb files, the
SPDX writer (each document checked by spdx-tools' own validator), attestations in an OCI
layout, and RedisOS's SBOM built from a real mirror, validated with `pyspdxtools -i`."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require
from package_builders import make_deb
from test_redisos import redisos  # noqa: F401  (the module's RedisOS build, a fixture)

from forge.formats.common.files import canonical_json
from forge.formats.debian import copyright as cr
from forge.formats.debian.inventory import inventory, pool_path, record
from forge.formats.image.layout import add_blob, write_index_document
from forge.formats.sbom.attestations import spdx_documents
from forge.formats.sbom.spdx import Document, created, deb_purl, dumps, spdx_id

MACHINE = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: hello

Files: *
Copyright: 2020 Someone
License: GPL-2+ or Artistic
 The licence text.

Files: lib/*
Copyright: 2021 Other
License: Expat

Files: contrib/*
Copyright: 2022 Third
License: GPL-2+ with OpenSSL exception
"""


def validate(doc: dict, tmp: Path) -> list[str]:
    """spdx-tools' messages for `doc` (empty: valid SPDX 2.3)."""
    pytest.importorskip("spdx_tools", reason="spdx-tools is a test dependency (pip install -e .[test])")
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
    path = tmp / "doc.spdx.json"
    path.write_bytes(dumps(doc))
    return [m.validation_message for m in validate_full_spdx_document(parse_file(str(path)))]


# --- copyright files --------------------------------------------------------------------

def test_machine_readable_copyright_gives_spdx_expressions_and_refs():
    expr, refs = cr.licenses(MACHINE)
    assert expr == ("(GPL-2.0-or-later OR Artistic-1.0) AND MIT AND "
                    "LicenseRef-GPL-2-with-OpenSSL-exception")
    assert refs == {"LicenseRef-GPL-2-with-OpenSSL-exception": "GPL-2+ with OpenSSL exception"}


def test_free_form_copyright_is_unknown_not_guessed():
    assert cr.licenses("This package was debianized by someone.\nLicense: GPL\n") == (None, {})


def test_commas_mean_and():
    assert cr.spdx_expression("BSD-3-clause, and Zlib")[0] == "BSD-3-Clause AND Zlib"


# --- the inventory of real packages -----------------------------------------------------

def _deb(tmp: Path, name="hello", version="1:2.0-1", copyright_text=MACHINE) -> Path:
    require(shutil.which("dpkg-deb") is not None, "dpkg-deb is not installed (dpkg)")
    import tempfile
    return make_deb(Path(tempfile.mkdtemp(dir=tmp)), name, version, files={
        f"usr/share/doc/{name}/copyright": copyright_text.encode(),
        "usr/bin/hello": b"#!/bin/sh\necho hello\n", "lib/x86_64-linux-gnu/libhello.so.1": b"\x7fELF"})


def test_record_of_a_deb(tmp_path):
    deb = _deb(tmp_path)
    rec = record(deb)
    assert (rec["package"], rec["version"], rec["architecture"], rec["source"]) == \
        ("hello", "1:2.0-1", "amd64", "hello")
    assert rec["sha256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert rec["size"] == deb.stat().st_size
    assert rec["license"].startswith("(GPL-2.0-or-later OR Artistic-1.0)")
    assert "usr/bin/hello" in rec["files"] and "lib/x86_64-linux-gnu/libhello.so.1" in rec["files"]
    assert pool_path(rec) == "pool/main/h/hello/hello_2.0-1_amd64.deb"
    assert deb_purl(rec) == "pkg:deb/debian/hello@1%3A2.0-1?arch=amd64"


def test_inventory_is_sorted_and_repeatable(tmp_path):
    a, b = _deb(tmp_path, "zed", "1.0"), _deb(tmp_path, "abc", "2.0")
    one, two = inventory([a, b]), inventory([b, a])
    assert [r["package"] for r in one] == ["abc", "zed"]
    assert canonical_json(one) == canonical_json(two)


# --- the SPDX writer --------------------------------------------------------------------

_RECORDS: dict[str, dict] = {}


def _doc(tmp: Path) -> Document:
    # one package per test: dpkg-deb stamps the time, and two would differ in sha256
    rec = _RECORDS.get(str(tmp)) or _RECORDS.setdefault(str(tmp), record(_deb(tmp)))
    doc = Document("//t:img")
    root = doc.image("//t:img", "sha256:" + "a" * 64)
    doc.describes.append(root)
    pkg = doc.deb(rec)
    doc.relate(root, "CONTAINS", pkg)
    doc.relate(pkg, "CONTAINS", doc.file("usr/bin/hello", b"#!/bin/sh\necho hello\n"))
    return doc


def test_document_is_valid_spdx_and_reproducible(tmp_path):
    d1 = _doc(tmp_path).to_dict(created(315532800), ["Tool: forge-test"])
    d2 = _doc(tmp_path).to_dict(created(315532800), ["Tool: forge-test"])
    assert dumps(d1) == dumps(d2)
    assert d1["creationInfo"]["created"] == "1980-01-01T00:00:00Z"
    assert validate(d1, tmp_path) == []
    pkg = next(p for p in d1["packages"] if p["name"] == "hello")
    assert pkg["externalRefs"][0]["referenceLocator"].startswith("pkg:deb/debian/hello@")
    assert pkg["filesAnalyzed"] is True  # it contains a file: SPDX then wants a verification code
    refs = {x["licenseId"] for x in d1["hasExtractedLicensingInfos"]}
    assert "LicenseRef-GPL-2-with-OpenSSL-exception" in refs


def test_the_validator_is_not_vacuous(tmp_path):
    d = _doc(tmp_path).to_dict(created(0), ["Tool: t"])
    d["hasExtractedLicensingInfos"] = []  # the LicenseRefs used are then undefined
    assert validate(d, tmp_path)


def test_namespace_follows_the_content(tmp_path):
    doc = _doc(tmp_path)
    before = doc.to_dict(created(0), ["Tool: t"])["documentNamespace"]
    doc.file("etc/motd", b"hi\n")
    assert doc.to_dict(created(0), ["Tool: t"])["documentNamespace"] != before


def test_merge_keeps_one_element_per_package(tmp_path):
    inner = _doc(tmp_path).to_dict(created(0), ["Tool: t"])
    outer = Document("//t:os")
    root = outer.package(spdx_id("os", "//t:os"), "//t:os", purpose="OPERATING-SYSTEM")
    outer.describes.append(root)
    outer.merge(inner, root)
    outer.merge(inner, root)
    d = outer.to_dict(created(0), ["Tool: t"])
    assert [p["name"] for p in d["packages"]].count("hello") == 1
    image_id = inner["documentDescribes"][0]
    assert {"spdxElementId": root, "relationshipType": "CONTAINS",
            "relatedSpdxElement": image_id} in d["relationships"]
    assert validate(d, tmp_path) == []


def cdx_errors(doc: dict) -> str | None:
    """cyclonedx-python-lib's strict JSON-schema check of a CycloneDX 1.6 document."""
    pytest.importorskip("cyclonedx", reason="cyclonedx-python-lib is a test dependency")
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    err = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(doc))
    return None if err is None else str(err.data.message)


def test_cyclonedx_twin_is_valid_and_reproducible(tmp_path):
    from forge.formats.sbom.cyclonedx import from_spdx
    spdx = _doc(tmp_path).to_dict(created(0), ["Tool: t"])
    one, two = from_spdx(spdx, "0.1.0"), from_spdx(_doc(tmp_path).to_dict(created(0), ["Tool: t"]), "0.1.0")
    assert dumps(one) == dumps(two)
    assert cdx_errors(one) is None
    hello = next(c for c in one["components"] if c["name"] == "hello")
    assert hello["purl"].startswith("pkg:deb/debian/hello@") and hello["licenses"][0]["expression"]
    assert one["metadata"]["component"]["type"] == "container"
    assert {"ref": one["metadata"]["component"]["bom-ref"], "dependsOn": [hello["bom-ref"]]} in one["dependencies"]
    one["components"][0]["type"] = "no-such-type"
    assert cdx_errors(one)  # the check is not vacuous


# --- attestations -----------------------------------------------------------------------

def test_spdx_attestations_of_a_layout_are_found_and_checked(tmp_path):
    layout = tmp_path / "layout"
    image_digest = "sha256:" + "b" * 64
    predicate = _doc(tmp_path).to_dict(created(0), ["Tool: buildkit"])
    statement = canonical_json({"_type": "https://in-toto.io/Statement/v1",
                                "predicateType": "https://spdx.dev/Document",
                                "subject": [{"name": "img", "digest": {"sha256": "b" * 64}}],
                                "predicate": predicate})
    st = add_blob(layout, statement, "application/vnd.in-toto+json")
    cfg = add_blob(layout, b"{}", "application/vnd.oci.image.config.v1+json")
    layer = {**st.to_dict(), "annotations": {"in-toto.io/predicate-type": "https://spdx.dev/Document"}}
    manifest = canonical_json({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "config": cfg.to_dict(), "layers": [layer]})
    m = add_blob(layout, manifest, "application/vnd.oci.image.manifest.v1+json")
    write_index_document(layout, {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                  "manifests": [{**m.to_dict(), "platform": {"os": "unknown", "architecture": "unknown"},
                                                 "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                                                 "vnd.docker.reference.digest": image_digest}}]})
    assert spdx_documents(layout, image_digest) == [predicate]
    assert spdx_documents(layout, "sha256:" + "c" * 64) == []
    blob = layout / "blobs" / "sha256" / st.digest.split(":")[1]
    blob.write_bytes(blob.read_bytes().replace(b"forge", b"f0rge"))
    from forge.formats.image.errors import LayoutError
    with pytest.raises(LayoutError, match="does not hash to its name"):
        spdx_documents(layout, image_digest)


# --- a Debian tree and RedisOS, built for real ------------------------------------------

@pytest.mark.real
@pytest.mark.parametrize("variant,expect", [
    ("extract", {"busybox-static", "runc", "libc6", "libseccomp2"}),  # and the dependencies
    # the essential set, installed before the rest (mmdebstrap's essential phase)
    ("minbase", {"busybox-static", "runc", "libc6", "base-files", "dpkg", "bash"}),
])
def test_debian_rootfs_lists_every_package_it_installed(ws, variant, expect):
    require(shutil.which("mmdebstrap") is not None, "mmdebstrap is not installed (dev/setup.sh)")
    ws.write({"BUILD": f'debian_rootfs(name = "t", suite = "bookworm", variant = "{variant}", '
                       'packages = ["busybox-static", "runc"])\n'})
    r = ws.build("//:t", timeout=900)
    assert r.code == 0, r.err
    out = ws.root / "forge-out"
    debs = json.loads((out / "t.debs.json").read_text())["packages"]
    names = {d["package"] for d in debs}
    assert expect <= names
    sbom = out / "t.sbom.spdx.json"
    doc = json.loads(sbom.read_text())
    assert validate(doc, ws.root.parent) == []
    pkgs = {p["name"]: p for p in doc["packages"] if p["name"] in names}
    assert set(pkgs) == names  # the tree holds every package apt installed
    image = doc["documentDescribes"][0]
    contained = {r["relatedSpdxElement"] for r in doc["relationships"]
                 if r["spdxElementId"] == image and r["relationshipType"] == "CONTAINS"}
    assert {p["SPDXID"] for p in pkgs.values()} <= contained
    index = json.loads((out / "t" / "index.json").read_text())
    assert next(p for p in doc["packages"] if p["SPDXID"] == image)["versionInfo"] == \
        index["manifests"][0]["digest"]
    origins = json.loads((out / "t.origins.json").read_text())["origins"]
    assert {d["sha256"] for d in debs} <= {o["digest"]["sha256"] for o in origins}
    assert any(o["name"] == "dists/bookworm/InRelease" for o in origins)
    # apt's cache, where the .debs were taken from, is empty in the image as before
    from forge.formats.image.layout import read_image
    import tarfile
    img = read_image(out / "t", None)
    with tarfile.open(img.layers[0][1]) as tf:
        assert not [n for n in tf.getnames() if n.endswith(".deb")]



@pytest.mark.real
def test_redisos_sbom_is_valid_and_complete(redisos):
    w = redisos
    out = w.root / "forge-out" / "images"
    path = out / "redisos.sbom.spdx.json"
    tool = Path(sys.executable).with_name("pyspdxtools")
    require(tool.exists(), "pyspdxtools is not installed (pip install -e .[test])")
    p = subprocess.run([str(tool), "-i", str(path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "invalid" not in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    doc = json.loads(path.read_text())
    names = {p["name"]: p for p in doc["packages"]}
    # the redis image holds redis-server and the libraries it links; the init, busybox and runc
    for name in ("redis-server", "libc6", "libssl3", "busybox-static", "runc"):
        assert name in names, sorted(names)
    assert "bash" not in names  # only in the build stage's tree
    kernel = next(p for n, p in names.items() if n.startswith("linux-image-"))
    purl = kernel["externalRefs"][0]["referenceLocator"]
    assert purl.startswith(f"pkg:deb/debian/{kernel['name']}@") and "arch=amd64" in purl
    files = {f["fileName"]: f for f in doc["files"]}
    assert any(n.endswith("/virtio_net.ko") for n in files)
    assert "./etc/hostname" in files
    assert files["./etc/hostname"]["checksums"][1]["checksumValue"] == hashlib.sha256(b"redisos\n").hexdigest()
    # every package's sha256 is its .deb's, as debian_rootfs recorded it
    debs = json.loads((out / "base" / "redis-build.debs.json").read_text())["packages"]
    by_name = {r["package"]: r for r in debs}
    assert names["redis-server"]["checksums"][0]["checksumValue"] == by_name["redis-server"]["sha256"]
    # the CycloneDX twin lists the same packages
    cdx = json.loads((out / "redisos.cdx.json").read_text())
    assert cdx_errors(cdx) is None
    assert {c["name"] for c in cdx["components"] if c["type"] != "file"} == set(names) - {"//images:redisos"}
    # the redis image's own SBOM, merged above, is a valid document too
    own = out / "redis" / "image.sbom.spdx.json"
    p = subprocess.run([str(tool), "-i", str(own)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "invalid" not in (p.stdout + p.stderr).lower(), p.stdout + p.stderr
    assert "redis-server" in {p["name"] for p in json.loads(own.read_text())["packages"]}
    # and the same document is at the image's root, in the initrd
    seg = next((out / "redisos.initrd").glob("*-sbom.cpio.gz"))
    assert _newc_files(gzip.decompress(seg.read_bytes()))["sbom.spdx.json"] == path.read_bytes()


def _newc_files(data: bytes) -> dict[str, bytes]:
    files, pos = {}, 0
    while pos + 110 <= len(data) and data[pos:pos + 6] == b"070701":
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        files[name] = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            break
    return files


def test_an_imported_images_spdx_attestation_is_merged_into_the_os_sbom(ws, tmp_path):
    """An OCI tarball whose index carries an SPDX attestation beside the image (as BuildKit
    exports it), used by a linuxkit_image: the OS's SBOM holds the attested packages."""
    import io
    import tarfile
    from forge.formats.image.layer_write import layer_from_dir
    from forge.formats.image.layout import image_config_defaults, load_index, write_image
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hello").write_text("hi\n")
    layout = tmp_path / "layout"
    with open(tmp_path / "layer.tar.gz", "wb") as f:
        info = layer_from_dir(tree, f, mtime=0)
    add_blob(layout, tmp_path / "layer.tar.gz", info.media_type)
    image = write_image(layout, image_config_defaults(diff_ids=[info.diff_id]), [info])
    attested = _doc(tmp_path)
    predicate = attested.to_dict(created(0), ["Tool: buildkit"])
    st = add_blob(layout, canonical_json({"_type": "https://in-toto.io/Statement/v1",
                                          "predicateType": "https://spdx.dev/Document",
                                          "subject": [{"name": "img", "digest": {"sha256": image.digest[7:]}}],
                                          "predicate": predicate}), "application/vnd.in-toto+json")
    # BuildKit's attestation config: in-toto layers are uncompressed, their diff_ids themselves
    cfg = add_blob(layout, canonical_json({"architecture": "unknown", "os": "unknown", "config": {},
                                           "rootfs": {"type": "layers", "diff_ids": [st.digest]}}),
                   "application/vnd.oci.image.config.v1+json")
    m = add_blob(layout, canonical_json({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg.to_dict(), "layers": [{**st.to_dict(), "annotations": {
            "in-toto.io/predicate-type": "https://spdx.dev/Document"}}]}),
        "application/vnd.oci.image.manifest.v1+json")
    index = load_index(layout)
    index["manifests"].append({**m.to_dict(), "platform": {"os": "unknown", "architecture": "unknown"},
                               "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                               "vnd.docker.reference.digest": image.digest}})
    write_index_document(layout, index)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in sorted(layout.rglob("*")):
            tf.add(p, arcname=p.relative_to(layout).as_posix(), recursive=False)
    (ws.root / "img.tar").write_bytes(buf.getvalue())
    ws.write({"BUILD": 'oci_archive(name = "img", src = "img.tar")\n'
                       'linuxkit_image(name = "os", assembly = "os.yml", formats = ["tar"])\n',
              "os.yml": 'onboot:\n  - name: hello\n    image: //:img\n    command: ["/bin/true"]\n'})
    r = ws.build("//:os")
    assert r.code == 0, r.err
    doc = json.loads((ws.root / "forge-out/os.sbom.spdx.json").read_text())
    assert validate(doc, tmp_path) == []
    names = {p["name"] for p in doc["packages"]}
    assert "hello" in names  # from the attestation
    img = next(p for p in doc["packages"] if p.get("versionInfo") == image.digest)
    assert {"spdxElementId": img["SPDXID"], "relationshipType": "CONTAINS",
            "relatedSpdxElement": predicate["documentDescribes"][0]} in doc["relationships"]
