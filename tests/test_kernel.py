"""kernel and deb_package against the machine's Debian mirror (the real cloud kernel)."""

from __future__ import annotations

import json
import tarfile

import pytest

from conftest import require
from forge.formats.debian.sources import debian_mirror, read_sources

pytestmark = pytest.mark.real


def test_cloud_kernel_with_only_the_virtio_net_modules(ws):
    require(debian_mirror(read_sources()) is not None, "no Debian mirror in the apt sources")
    ws.write({"k/BUILD": 'kernel(name = "cloud", modules = ["virtio_net", "virtio_pci"])\n'})
    r = ws.build("//k:cloud")
    assert r.code == 0, r.err
    out = ws.root / "forge-out/k/cloud"
    assert (out / "kernel").read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    version = (out / "version").read_text().strip()
    assert version.endswith("-cloud-amd64")
    order = [p.rsplit("/", 1)[-1][:-3] for p in (out / "modules.load").read_text().split()]
    assert set(order) == {"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                          "virtio_pci", "failover", "net_failover", "virtio_net"}
    for mod, needs in {"virtio_net": ["net_failover", "virtio", "virtio_ring"],
                       "net_failover": ["failover"],
                       "virtio_pci": ["virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"]}.items():
        assert all(order.index(n) < order.index(mod) for n in needs), order
    with tarfile.open(out / "kernel.tar") as tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
    assert len(names) == 8 and all(n.startswith(f"lib/modules/{version}/") for n in names)
    pin = json.loads(json.loads((ws.root / "forge.lock").read_text())["pins"]["debkernel"][
        "bookworm/amd64/linux-image-cloud-amd64"])
    assert pin["Package"] == f"linux-image-{version}" and len(pin["SHA256"]) == 64
    # Offline with the pin and the cache: nothing is fetched.
    assert ws.build("//k:cloud", "--offline").err.strip().endswith("0 executed, 2 cached")


def test_unknown_module_is_a_clear_failure(ws):
    require(debian_mirror(read_sources()) is not None, "no Debian mirror in the apt sources")
    ws.write({"k/BUILD": 'kernel(name = "cloud", modules = ["virtio_nett"])\n'})
    r = ws.build("//k:cloud")
    assert r.code == 1 and "unknown kernel module 'virtio_nett'" in r.err and "virtio_net" in r.err
    assert "Traceback" not in r.err


def test_kernel_from_an_image_in_linuxkit_layout(ws, tmp_path):
    """An OCI image with /kernel and /kernel.tar (LinuxKit's kernel images), made here from
    gcc-built objects with a .modinfo section, imported with oci_archive."""
    import io
    from package_builders import compile_module
    from forge.formats.image.layer_write import layer_from_dir
    from forge.formats.image.archive import export_oci_archive
    from forge.formats.image.layout import add_blob, image_config_defaults, write_image
    mods = {"dep_a": "", "dep_b": "dep_a", "top": "dep_b", "unused": ""}
    ktar = io.BytesIO()
    with tarfile.open(fileobj=ktar, mode="w") as tf:
        for name, deps in mods.items():
            data = compile_module(tmp_path, [f"name={name}", f"depends={deps}"], name)
            ti = tarfile.TarInfo(f"lib/modules/9.9.9-test/kernel/{name}.ko")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "kernel").write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    (root / "kernel.tar").write_bytes(ktar.getvalue())
    layout = tmp_path / "layout"
    with open(tmp_path / "layer.tgz", "wb") as f:
        info = layer_from_dir(root, f, mtime=0)
    add_blob(layout, tmp_path / "layer.tgz", info.media_type)
    write_image(layout, image_config_defaults(diff_ids=[info.diff_id]), [info])
    with open(ws.root / "kimg.tar", "wb") as f:
        export_oci_archive(layout, f)
    ws.write({"BUILD": 'oci_archive(name = "kimg", src = "kimg.tar")\n'
                       'kernel(name = "k", image = ":kimg", modules = ["top"])\n'})
    r = ws.build("//:k")
    assert r.code == 0, r.err
    out = ws.root / "forge-out/k"
    assert (out / "modules.load").read_text().split() == [
        f"/lib/modules/9.9.9-test/kernel/{m}.ko" for m in ("dep_a", "dep_b", "top")]
    assert (out / "version").read_text().strip() == "9.9.9-test"
    with tarfile.open(out / "kernel.tar") as tf:
        assert sorted(m.name for m in tf.getmembers() if m.isfile()) == sorted(
            f"lib/modules/9.9.9-test/kernel/{m}.ko" for m in ("dep_a", "dep_b", "top"))
