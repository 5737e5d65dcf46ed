"""SBOM attestations of pulled images, against a real registry (Debian's docker-registry):
an index holding an image and BuildKit's attestation manifest for it is pushed with forge's
own push code, `oci_pull` keeps the attestation (every blob checked), and a
container_image built FROM the pulled image merges the attested SBOM into its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry_fixture import registry  # noqa: F401  (fixture)
from test_pull import new_ws
from test_sbom import _doc, validate

from forge.formats.common.files import canonical_json
from forge.formats.image.layout import add_blob, image_config_defaults, write_image, write_index
from forge.formats.image.spec import OCI_INDEX, Descriptor
from forge.formats.registry.client import RegistryClient
from forge.formats.sbom.spdx import created

pytestmark = pytest.mark.real

INTOTO = "application/vnd.in-toto+json"


def attested_layout(tmp_path):
    """An OCI layout as BuildKit exports it: a linux/amd64 image with one file, and an
    attestation manifest whose in-toto layer carries an SPDX document listing `hello`.
    Returns (layout, image digest, statement digest, the SPDX predicate)."""
    from forge.formats.image.layer_write import layer_from_dir
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hello").write_text("hi\n")
    layout = tmp_path / "layout"
    with open(tmp_path / "layer.tar.gz", "wb") as f:
        info = layer_from_dir(tree, f, mtime=0)
    add_blob(layout, tmp_path / "layer.tar.gz", info.media_type)
    image = write_image(layout, image_config_defaults(diff_ids=[info.diff_id]), [info])
    predicate = _doc(tmp_path).to_dict(created(0), ["Tool: buildkit"])
    st = add_blob(layout, canonical_json({
        "_type": "https://in-toto.io/Statement/v1", "predicateType": "https://spdx.dev/Document",
        "subject": [{"name": "img", "digest": {"sha256": image.digest[7:]}}],
        "predicate": predicate}), INTOTO)
    # BuildKit's attestation config: in-toto layers are uncompressed, their diff_ids themselves
    cfg = add_blob(layout, canonical_json({"architecture": "unknown", "os": "unknown", "config": {},
                                           "rootfs": {"type": "layers", "diff_ids": [st.digest]}}),
                   "application/vnd.oci.image.config.v1+json")
    m = add_blob(layout, canonical_json({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg.to_dict(), "layers": [{**st.to_dict(), "annotations": {
            "in-toto.io/predicate-type": "https://spdx.dev/Document"}}]}),
        "application/vnd.oci.image.manifest.v1+json")
    nest(layout, [
        Descriptor(image.media_type, image.digest, image.size, {"os": "linux", "architecture": "amd64"}),
        Descriptor(m.media_type, m.digest, m.size, {"os": "unknown", "architecture": "unknown"},
                   {"vnd.docker.reference.type": "attestation-manifest",
                    "vnd.docker.reference.digest": image.digest})])
    return layout, image.digest, st.digest, predicate


def nest(layout, entries: list[Descriptor]) -> None:
    """index.json naming one index of `entries`, as BuildKit's OCI export is: pushing the
    layout pushes that index."""
    idx = add_blob(layout, canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                           "manifests": [e.to_dict() for e in entries]}), OCI_INDEX)
    write_index(layout, [idx])


def test_a_pulled_images_attestation_is_kept_and_merged(tmp_path, registry):
    layout, image_digest, statement, predicate = attested_layout(tmp_path)
    index_digest = RegistryClient().push(layout, f"{registry.host}/team/att:v1")
    w = new_ws(tmp_path, "consumer")
    w.write({"p/BUILD": f'''
        oci_pull(name = "base", image = "{registry.host}/team/att:v1")
        container_image(name = "img", srcs = ["b.txt"], bases = {{"base": ":base"}})
        container_image(name = "direct", dockerfile = "Dockerfile.direct", srcs = ["b.txt"])
    ''', "p/b.txt": "top\n", "p/Dockerfile": "FROM base\nCOPY b.txt /b.txt\n",
        # FROM the registry itself, through a stage: the chain's root is the pulled image
        "p/Dockerfile.direct": f"FROM {registry.host}/team/att:v1 AS one\nFROM one\nCOPY b.txt /b.txt\n"})
    r = w.build("//p:img", "//p:direct")
    assert r.code == 0, r.err
    direct = json.loads((w.root / "forge-out/p/direct.sbom.spdx.json").read_text())
    assert "hello" in {p["name"] for p in direct["packages"]}
    assert json.loads((w.root / "forge.lock").read_text())["pins"]["oci"] == {
        f"{registry.host}/team/att:v1": index_digest}
    index = json.loads((w.root / "forge-out/p/base/index.json").read_text())
    kinds = [(d.get("annotations") or {}).get("vnd.docker.reference.type") for d in index["manifests"]]
    assert kinds == [None, "attestation-manifest"]
    assert index["manifests"][1]["annotations"]["vnd.docker.reference.digest"] == image_digest
    doc = json.loads((w.root / "forge-out/p/img.sbom.spdx.json").read_text())
    assert validate(doc, tmp_path) == []
    assert "hello" in {p["name"] for p in doc["packages"]}  # only the attestation lists it
    root = doc["documentDescribes"][0]
    assert {"spdxElementId": root, "relationshipType": "CONTAINS",
            "relatedSpdxElement": predicate["documentDescribes"][0]} in doc["relationships"]

    # Pushing the pulled image pushes the image, as before the pull kept its attestations.
    pulled = w.root / "forge-out/p/base"
    assert RegistryClient().push(pulled, f"{registry.host}/team/copy:other") == image_digest  # not its tag

    # The registry's copy of the statement altered: a clear failure naming the blob.
    w2 = new_ws(tmp_path, "tampered")
    w2.write({"p/BUILD": f'oci_pull(name = "base", image = "{registry.host}/team/att:v1")\n',
              "forge.lock": (w.root / "forge.lock").read_text()})
    data = registry.blob_path(statement)
    data.write_bytes(data.read_bytes().replace(b"hello", b"hellx"))
    r = w2.build("//p:base")
    assert r.code == 1, (r.code, r.err)
    assert f"blob {statement}" in r.err and "hashes to" in r.err and "Traceback" not in r.err
    assert not (w2.root / "forge-out/p/base").exists()


def test_an_image_without_attestations_pulls_as_before(tmp_path, registry):
    """The puller fetches attestation manifests only for the image it pulls."""
    layout, image_digest, _, _ = attested_layout(tmp_path)
    top = json.loads((layout / "index.json").read_text())["manifests"][0]
    index = json.loads((layout / "blobs/sha256" / top["digest"][7:]).read_text())
    index["manifests"][1]["annotations"]["vnd.docker.reference.digest"] = "sha256:" + "b" * 64
    nest(layout, [Descriptor.from_dict(d) for d in index["manifests"]])
    ref = f"{registry.host}/team/att:other"
    RegistryClient().push(layout, ref)
    got = RegistryClient().pull(ref, tmp_path / "pulled")
    assert got.manifest_digest == image_digest and got.attestations == ()
    entries = json.loads((tmp_path / "pulled/index.json").read_text())["manifests"]
    assert [d["digest"] for d in entries] == [image_digest]


def test_a_linuxkit_image_merges_a_pulled_images_attestation(tmp_path, registry):
    """The OS's SBOM lists the packages attested for an image its assembly pulls."""
    from conftest import require
    from test_linuxkit import make_workspace
    require(Path("/bin/busybox").is_file(), "busybox-static is not installed (apt-get install busybox-static)")
    layout, image_digest, _, predicate = attested_layout(tmp_path)
    RegistryClient().push(layout, f"{registry.host}/team/att:v1")
    lk = make_workspace(tmp_path / "ws", tmp_path / "cache")
    text = (lk.root / "os.yml").read_text()
    assert "  - name: other\n    image: app" in text
    (lk.root / "os.yml").write_text(text.replace(
        "  - name: other\n    image: app", f"  - name: other\n    image: {registry.host}/team/att:v1"))
    r = lk.build("//:os")
    assert r.code == 0, r.err
    doc = json.loads((lk.root / "forge-out/os.sbom.spdx.json").read_text())
    assert validate(doc, tmp_path) == []
    img = next(p for p in doc["packages"] if p.get("versionInfo") == image_digest)
    assert "hello" in {p["name"] for p in doc["packages"]}  # only the attestation lists it
    assert {"spdxElementId": img["SPDXID"], "relationshipType": "CONTAINS",
            "relatedSpdxElement": predicate["documentDescribes"][0]} in doc["relationships"]
