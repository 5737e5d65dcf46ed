"""OCI layouts: writing, reading, verifying, and docker-save / OCI tarballs."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from conftest import require
from forge.formats.common.files import canonical_json
from forge.formats.image.archive import export_docker_archive, export_oci_archive, import_archive
from forge.formats.image.errors import LayoutError
from forge.formats.image.layer_write import normalise
from forge.formats.image.layout import (add_blob, blob_path, image_config_defaults, merge_layouts,
                                        read_image, verify_layout, write_image, write_index)
from forge.formats.image.spec import OCI_INDEX, OCI_LAYER, OCI_MANIFEST


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            t = tarfile.TarInfo(name)
            t.size, t.mtime = len(data), 1_700_000_000
            tf.addfile(t, io.BytesIO(data))
    return buf.getvalue()


def layer(tmp_path: Path, files: dict[str, bytes], *, compress=True):
    """A normalised layer file and its LayerInfo."""
    out = tmp_path / f"layer-{uuid.uuid4().hex}"
    with open(out, "wb") as f:
        info = normalise(io.BytesIO(tar_of(files)), f, mtime=0, compress=compress)
    return out, info


def make_image(layout: Path, tmp_path: Path, *, platform="linux/amd64", append=False,
               marker=b"hello"):
    infos = []
    for files, compress in (({"etc/motd": marker}, True), ({"bin/app": b"#!/bin/sh\n"}, False)):
        path, info = layer(tmp_path, files, compress=compress)
        add_blob(layout, path, info.media_type)
        infos.append(info)
    config = image_config_defaults(diff_ids=[i.diff_id for i in infos], platform=platform,
                                   cmd=["/bin/app"], env={"PATH": "/bin"}, exposed_ports=[6379])
    desc = write_image(layout, config, infos, platform=platform.split("/"), append=append)
    return desc, infos


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_then_read(tmp_path):
    layout = tmp_path / "img"
    desc, infos = make_image(layout, tmp_path)
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["mediaType"] == OCI_INDEX
    assert index["manifests"][0]["platform"] == {"os": "linux", "architecture": "amd64"}
    img = read_image(layout)
    assert img.manifest_digest == desc.digest and img.manifest["mediaType"] == OCI_MANIFEST
    assert img.config["config"]["Cmd"] == ["/bin/app"]
    assert img.config["config"]["ExposedPorts"] == {"6379/tcp": {}}
    assert "created" not in img.config
    assert img.config["rootfs"]["diff_ids"] == [i.diff_id for i in infos]
    assert [d["digest"] for d, _ in img.layers] == [i.digest for i in infos]
    assert all(p.is_file() for _, p in img.layers)
    assert img.layers[1][0]["mediaType"] == OCI_LAYER
    verify_layout(layout)


def test_layouts_are_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_image(a, tmp_path / "x" if (tmp_path / "x").mkdir() is None else None)
    make_image(b, tmp_path / "y" if (tmp_path / "y").mkdir() is None else None)
    assert tree_bytes(a) == tree_bytes(b)
    outs = []
    for lay in (a, b):
        buf = io.BytesIO()
        export_oci_archive(lay, buf)
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]


def test_verify_detects_tampered_blob(tmp_path):
    layout = tmp_path / "img"
    _, infos = make_image(layout, tmp_path)
    p = blob_path(layout, infos[1].digest)
    data = bytearray(p.read_bytes())
    data[600] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(LayoutError, match=infos[1].digest):
        verify_layout(layout)


def test_verify_detects_missing_blob(tmp_path):
    layout = tmp_path / "img"
    _, infos = make_image(layout, tmp_path)
    blob_path(layout, infos[0].digest).unlink()
    with pytest.raises(LayoutError, match=f"{infos[0].digest}.*missing"):
        verify_layout(layout)


def test_verify_detects_wrong_diff_id(tmp_path):
    layout = tmp_path / "img"
    _, infos = make_image(layout, tmp_path)
    config = image_config_defaults(diff_ids=[infos[1].diff_id, infos[0].diff_id])
    with pytest.raises(LayoutError, match="diff_id"):
        write_image(layout, config, infos)  # caught early when the layers know theirs
    write_image(layout, config, [i.descriptor() for i in infos])
    with pytest.raises(LayoutError, match=f"{infos[0].digest}.*diff_id"):
        verify_layout(layout)


def test_platform_selection_and_nested_index(tmp_path):
    layout = tmp_path / "img"
    amd, _ = make_image(layout, tmp_path, platform="linux/amd64", marker=b"amd")
    arm, _ = make_image(layout, tmp_path, platform="linux/arm64/v8", append=True, marker=b"arm")
    assert read_image(layout, "linux/amd64").manifest_digest == amd.digest
    assert read_image(layout, "linux/arm64").manifest_digest == arm.digest
    assert read_image(layout, "linux/arm64/v8").config["architecture"] == "arm64"
    with pytest.raises(LayoutError, match="linux/s390x.*available: linux/amd64, linux/arm64/v8"):
        read_image(layout, "linux/s390x")
    with pytest.raises(LayoutError, match="holds 2 images"):
        read_image(layout, None)
    # The same two manifests behind a nested index, as registries and buildx write them.
    inner = json.loads((layout / "index.json").read_bytes())
    nested = add_blob(layout, canonical_json(inner), OCI_INDEX)
    write_index(layout, [nested])
    assert read_image(layout, "linux/arm64").manifest_digest == arm.digest
    verify_layout(layout)


def test_platform_from_config_when_index_has_none(tmp_path):
    layout = tmp_path / "img"
    desc, _ = make_image(layout, tmp_path)
    index = json.loads((layout / "index.json").read_bytes())
    del index["manifests"][0]["platform"]
    (layout / "index.json").write_bytes(canonical_json(index))
    assert read_image(layout, "linux/amd64").manifest_digest == desc.digest
    assert read_image(layout, None).manifest_digest == desc.digest


def docker_save_tarball(tmp_path: Path) -> tuple[Path, list[str]]:
    """A hand-made archive as `docker save` of engine 20.10 writes it."""
    l1, l2 = tar_of({"etc/os-release": b"ID=test\n"}), tar_of({"bin/x": b"x"})
    diff_ids = ["sha256:" + hashlib.sha256(x).hexdigest() for x in (l1, l2)]
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
                         "config": {"Cmd": ["/bin/x"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids + diff_ids[:1]}}).encode()
    cid = hashlib.sha256(config).hexdigest()
    files = {f"{cid}.json": config, "aaa/layer.tar": l1, "aaa/VERSION": b"1.0",
             "bbb/layer.tar": l2,
             "manifest.json": json.dumps([{"Config": f"{cid}.json", "RepoTags": ["test/img:1"],
                                           "Layers": ["aaa/layer.tar", "bbb/layer.tar",
                                                      "ccc/layer.tar"]}]).encode(),
             "repositories": b'{"test/img":{"1":"bbb"}}'}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            t = tarfile.TarInfo(name)
            t.size = len(data)
            tf.addfile(t, io.BytesIO(data))
        t = tarfile.TarInfo("ccc/layer.tar")  # a repeated layer is a symlink
        t.type, t.linkname = tarfile.SYMTYPE, "../aaa/layer.tar"
        tf.addfile(t)
    path = tmp_path / "saved.tar"
    path.write_bytes(buf.getvalue())
    return path, diff_ids + diff_ids[:1]


def test_import_docker_save(tmp_path):
    archive, diff_ids = docker_save_tarball(tmp_path)
    layout = tmp_path / "img"
    desc = import_archive(archive, layout)
    assert desc.annotations == {"io.containerd.image.name": "test/img:1",
                                "org.opencontainers.image.ref.name": "1"}
    img = read_image(layout)
    assert img.manifest_digest == desc.digest
    assert img.config["rootfs"]["diff_ids"] == diff_ids
    assert [d["digest"] for d, _ in img.layers] == diff_ids  # kept uncompressed
    assert {d["mediaType"] for d, _ in img.layers} == {OCI_LAYER}
    with tarfile.open(archive) as tf:  # the config kept byte for byte: same image ID
        config_name = json.load(tf.extractfile("manifest.json"))[0]["Config"]
    assert img.config_digest == "sha256:" + config_name.removesuffix(".json")
    verify_layout(layout)


def test_import_rejects_wrong_diff_id(tmp_path):
    archive, _ = docker_save_tarball(tmp_path)
    with tarfile.open(archive) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    files["bbb/layer.tar"] = tar_of({"bin/x": b"evil"})
    files["ccc/layer.tar"] = files["aaa/layer.tar"]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(tar_of(files))
    with pytest.raises(LayoutError, match="bbb/layer.tar has diff_id"):
        import_archive(bad, tmp_path / "img")


def test_import_oci_tarball(tmp_path):
    src = tmp_path / "src"
    desc, infos = make_image(src, tmp_path)
    # A tarball made with `tar -C src .`: names start with './'.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(src, arcname=".")
    archive = tmp_path / "oci.tar"
    archive.write_bytes(buf.getvalue())
    layout = tmp_path / "img"
    assert import_archive(archive, layout) == desc
    verify_layout(layout)
    assert read_image(layout).config["rootfs"]["diff_ids"] == [i.diff_id for i in infos]
    exported = io.BytesIO()
    export_oci_archive(layout, exported)
    again = tmp_path / "again.tar"
    again.write_bytes(exported.getvalue())
    assert import_archive(again, tmp_path / "img2").digest == desc.digest


def test_import_refuses_tampered_oci_blob(tmp_path):
    src = tmp_path / "src"
    _, infos = make_image(src, tmp_path)
    p = blob_path(src, infos[0].digest)
    data = bytearray(p.read_bytes())
    data[20] ^= 0xff
    p.write_bytes(bytes(data))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(src, arcname="")
    (tmp_path / "oci.tar").write_bytes(buf.getvalue())
    with pytest.raises(LayoutError, match=infos[0].digest):
        import_archive(tmp_path / "oci.tar", tmp_path / "img")


def test_not_an_archive(tmp_path):
    (tmp_path / "x.tar").write_bytes(tar_of({"hello": b"x"}))
    with pytest.raises(LayoutError, match="neither"):
        import_archive(tmp_path / "x.tar", tmp_path / "img")


def test_docker_archive_round_trip(tmp_path):
    layout = tmp_path / "img"
    _, infos = make_image(layout, tmp_path)
    outs = []
    for _ in range(2):
        buf = io.BytesIO()
        export_docker_archive(layout, buf, ["forge/test", "localhost:5000/x/y:v1"])
        outs.append(buf.getvalue())
    assert outs[0] == outs[1]
    with tarfile.open(fileobj=io.BytesIO(outs[0])) as tf:
        ms = tf.getmembers()
        manifest = json.load(tf.extractfile("manifest.json"))
        layers = [tf.extractfile(n).read() for n in manifest[0]["Layers"]]
    assert {m.mtime for m in ms} == {0} and {m.uname for m in ms} == {""}
    assert manifest[0]["RepoTags"] == ["forge/test:latest", "localhost:5000/x/y:v1"]
    assert ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers] == \
        [i.diff_id for i in infos]  # stored uncompressed
    archive = tmp_path / "saved.tar"
    archive.write_bytes(outs[0])
    back = tmp_path / "back"
    import_archive(archive, back)
    img, orig = read_image(back), read_image(layout)
    assert img.config["rootfs"]["diff_ids"] == orig.config["rootfs"]["diff_ids"]
    assert img.config_digest == orig.config_digest
    verify_layout(back)


def test_add_blob_from_file_and_bytes(tmp_path):
    layout = tmp_path / "img"
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    d1 = add_blob(layout, src)
    d2 = add_blob(layout, b"abc")
    assert d1 == d2 and d1.size == 3
    assert d1.digest == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert blob_path(layout, d1.digest).read_bytes() == b"abc"
    assert not [p for p in (layout / "blobs/sha256").iterdir() if p.name.startswith(".")]
    with pytest.raises(LayoutError, match="invalid digest"):
        blob_path(layout, "sha256:../../etc/passwd")


def docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.real
def test_docker_load_and_save_round_trip(tmp_path):
    require(docker_works(), "no Docker daemon answers `docker info` (start dockerd)")
    layout = tmp_path / "img"
    _, infos = make_image(layout, tmp_path, marker=uuid.uuid4().hex.encode())
    tag = f"forge-test/oci:{uuid.uuid4().hex[:12]}"
    archive = tmp_path / "export.tar"
    with open(archive, "wb") as f:
        export_docker_archive(layout, f, [tag])
    try:
        subprocess.run(["docker", "load", "-i", str(archive)], check=True, capture_output=True)
        saved = tmp_path / "saved.tar"
        subprocess.run(["docker", "save", "-o", str(saved), tag], check=True, capture_output=True)
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
    back = tmp_path / "back"
    desc = import_archive(saved, back)
    img = read_image(back)
    assert img.config["rootfs"]["diff_ids"] == [i.diff_id for i in infos]
    assert img.config_digest == read_image(layout).config_digest  # docker kept the config
    assert tag in json.dumps(desc.annotations)
    verify_layout(back)


def _one_arch(tmp_path: Path, arch: str, text: bytes) -> Path:
    out = tmp_path / f"layout-{arch}-{uuid.uuid4().hex[:6]}"
    blob, info = layer(tmp_path, {"arch.txt": text})
    add_blob(out, blob, info.media_type)
    write_image(out, image_config_defaults(diff_ids=[info.diff_id], platform=f"linux/{arch}"),
                [info], platform=("linux", arch))
    return out


def test_merged_layouts_are_one_index_per_platform(tmp_path):
    amd, arm = _one_arch(tmp_path, "amd64", b"x86\n"), _one_arch(tmp_path, "arm64", b"arm\n")
    out = tmp_path / "index"
    merge_layouts(out, [amd, arm])
    verify_layout(out)
    index = json.loads((out / "index.json").read_text())
    assert [m["platform"] for m in index["manifests"]] == [
        {"os": "linux", "architecture": "amd64"}, {"os": "linux", "architecture": "arm64"}]
    for arch, src in (("amd64", amd), ("arm64", arm)):
        assert read_image(out, f"linux/{arch}").manifest_digest == read_image(src, None).manifest_digest
    again = tmp_path / "again"
    merge_layouts(again, [amd, arm])
    assert (again / "index.json").read_bytes() == (out / "index.json").read_bytes()
    with pytest.raises(LayoutError, match="both hold an image for linux/arm64"):
        merge_layouts(tmp_path / "dup", [arm, _one_arch(tmp_path, "arm64", b"other\n")])
