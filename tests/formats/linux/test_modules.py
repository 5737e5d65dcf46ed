"""Kernel module .modinfo and load order, on ELF objects made by gcc and on the real kernel."""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import subprocess

import pytest

from conftest import require
from package_builders import compile_module
from forge.formats.linux.errors import ModuleError
from forge.formats.linux.modules import index_tar, index_tree, load_order, modinfo

# The virtio network stack of the Debian cloud kernel, with its real depends= fields.
VIRTIO = {
    "virtio_ring": "",
    "virtio_pci_modern_dev": "",
    "virtio_pci_legacy_dev": "",
    "virtio": "",
    "virtio_pci": "virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio,virtio_ring",
    "failover": "",
    "net_failover": "failover",
    "virtio_net": "net_failover,virtio,virtio_ring",
}
# The order that booted by hand (os-pipeline.md, trap 1).
DOC_ORDER = ["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio",
             "virtio_pci", "failover", "net_failover", "virtio_net"]


@pytest.fixture(scope="module")
def virtio(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("ko")
    return {name: compile_module(tmp, [f"name={name}", f"depends={deps}", "license=GPL",
                                       "alias=virtio:d00000001v*", "alias=second"], name)
            for name, deps in VIRTIO.items()}


def assert_topological(order: list[str], infos: dict[str, dict]) -> None:
    assert len(order) == len(set(order))
    for i, name in enumerate(order):
        for dep in filter(None, ",".join(infos[name].get("depends", [])).split(",")):
            assert dep in order[:i], f"{name} loads before its dependency {dep}: {order}"


def test_modinfo_of_an_object(virtio):
    info = modinfo(virtio["virtio_net"])
    assert info == {"name": ["virtio_net"], "depends": ["net_failover,virtio,virtio_ring"],
                    "license": ["GPL"], "alias": ["virtio:d00000001v*", "second"]}
    assert modinfo(virtio["virtio"])["depends"] == [""]


@pytest.mark.parametrize("compress", [lzma.compress, gzip.compress], ids=["xz", "gz"])
def test_compressed_modules(virtio, compress):
    assert modinfo(compress(virtio["virtio_pci"]))["depends"] == [VIRTIO["virtio_pci"]]


def test_zstd_module(virtio, tmp_path):
    require(shutil.which("zstd") is not None, "zstd is not installed (apt-get install zstd)")
    (tmp_path / "m.ko").write_bytes(virtio["failover"])
    subprocess.run(["zstd", "-q", str(tmp_path / "m.ko")], check=True)
    data = (tmp_path / "m.ko.zst").read_bytes()
    assert modinfo(data)["name"] == ["failover"]
    with pytest.raises(ModuleError, match="truncated"):
        modinfo(data[:-8])


def test_not_a_module(tmp_path):
    with pytest.raises(ModuleError, match="not an ELF"):
        modinfo(b"#!/bin/sh\n")
    plain = compile_module(tmp_path, [], "empty")  # an empty .modinfo is still a section
    assert modinfo(plain) == {}
    src = tmp_path / "x.c"
    src.write_text("int f(void) { return 1; }\n")
    subprocess.run(["gcc", "-c", "-o", str(tmp_path / "x.o"), str(src)], check=True)
    with pytest.raises(ModuleError, match="no .modinfo"):
        modinfo((tmp_path / "x.o").read_bytes())


def test_load_order_of_the_virtio_stack(virtio):
    infos = {n: modinfo(b) for n, b in virtio.items()}
    order = load_order(infos, ["virtio_net", "virtio_pci"])
    assert sorted(order) == sorted(DOC_ORDER)
    assert_topological(order, infos)
    assert_topological(DOC_ORDER, infos)
    # what virtio_net needs first, then what only virtio_pci needs; ties by name
    assert order == ["failover", "net_failover", "virtio", "virtio_ring", "virtio_net",
                     "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci"]
    reordered = dict(sorted(infos.items(), reverse=True))
    assert load_order(reordered, ["virtio_net", "virtio_pci"]) == order
    assert load_order(infos, ["virtio-pci"])[-1] == "virtio_pci"
    assert load_order(infos, ["virtio_pci", "virtio_net"])[:5] == \
        ["virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_ring", "virtio_pci"]
    assert "virtio_pci" not in load_order(infos, ["virtio_net"])


def test_unknown_module(virtio):
    infos = {n: modinfo(b) for n, b in virtio.items()}
    with pytest.raises(KeyError) as e:
        load_order(infos, ["virtio_net", "virtio_nett"])
    assert isinstance(e.value, ModuleError)
    assert str(e.value) == "unknown kernel module 'virtio_nett'; close names: virtio_net, virtio_ring, virtio, virtio_pci"
    infos["virtio_net"] = {"depends": ["net_failover,virtio_blk"]}
    with pytest.raises(ModuleError, match=r"'virtio_blk' \(a dependency of virtio_net\); close names: virtio"):
        load_order(infos, ["virtio_net"])
    with pytest.raises(ModuleError, match="no close names"):
        load_order(infos, ["ext4"])


def test_dependency_cycle():
    infos = {"a": {"depends": ["b"]}, "b": {"depends": ["c,x"]}, "c": {"depends": ["a"]},
             "x": {"depends": [""]}, "d": {"depends": ["a"]}}
    with pytest.raises(ModuleError, match=r"cycle: a -> b -> c -> a$"):
        load_order(infos, ["d"])
    with pytest.raises(ModuleError, match=r"cycle: s -> s$"):
        load_order({"s": {"depends": ["s"]}}, ["s"])


def test_index_tree(virtio, tmp_path):
    base = tmp_path / "root/lib/modules/6.1.0-99-cloud-amd64/kernel/drivers"
    (base / "virtio").mkdir(parents=True)
    (base / "net").mkdir(parents=True)
    (base / "virtio/virtio_ring.ko").write_bytes(virtio["virtio_ring"])
    (base / "virtio/virtio.ko.xz").write_bytes(lzma.compress(virtio["virtio"]))
    (base / "net/net_failover.ko.gz").write_bytes(gzip.compress(virtio["net_failover"]))
    nameless = compile_module(tmp_path, ["depends=net_failover"], "nameless")
    (base / "net/my-driver.ko").write_bytes(nameless)
    (base.parent / "modules.order").write_text("not a module\n")
    tree = index_tree(tmp_path / "root")
    assert sorted(tree) == ["my_driver", "net_failover", "virtio", "virtio_ring"]
    assert tree["virtio"][0] == base / "virtio/virtio.ko.xz"
    assert tree["my_driver"][1]["depends"] == ["net_failover"]
    (tmp_path / "root/lib/modules/6.2.0/x.ko").parent.mkdir(parents=True)
    (tmp_path / "root/lib/modules/6.2.0/x.ko").write_bytes(virtio["failover"])
    with pytest.raises(ModuleError, match="several kernels"):
        index_tree(tmp_path / "root")


def test_index_tar_of_a_deb(virtio, tmp_path):
    from forge.formats.debian.package import open_data_tar
    from package_builders import make_deb

    files = {f"lib/modules/6.1.0-99-cloud-amd64/kernel/{n}.ko": b for n, b in virtio.items()}
    files["boot/vmlinuz-6.1.0-99-cloud-amd64"] = b"kernel"
    deb = make_deb(tmp_path, "linux-image-test", "1", "xz", files)
    with open_data_tar(deb) as tf:
        mods = index_tar(tf)
    assert sorted(mods) == sorted(VIRTIO)
    assert mods["virtio_net"][0].endswith("kernel/virtio_net.ko")
    order = load_order({n: info for n, (_, info) in mods.items()}, ["virtio_net", "virtio_pci"])
    assert order[-1] == "virtio_pci"


@pytest.mark.real
@pytest.mark.slow
def test_real_cloud_kernel_module_order(tmp_path_factory):
    from conftest import require
    from forge.formats.debian.sources import debian_mirror, read_sources
    from forge.formats.debian.archive import depends, download, fetch_index, resolve
    from forge.formats.debian.keyring import apt_keyrings
    from forge.formats.debian.package import open_data_tar

    mirror = debian_mirror(read_sources())
    require(mirror is not None, "no Debian mirror in the apt sources")
    index = fetch_index(mirror, "bookworm", keyrings=apt_keyrings(mirror, "bookworm", read_sources()))
    meta = resolve(index, "linux-image-cloud-amd64")
    name = next(n for alts in depends(meta) for n in alts
                if re.fullmatch(r"linux-image-.+-cloud-amd64(-unsigned)?", n))
    deb = download(mirror, resolve(index, name), tmp_path_factory.mktemp("kernel") / "kernel.deb")
    with open_data_tar(deb) as tf:
        mods = index_tar(tf)
    infos = {n: info for n, (_, info) in mods.items()}
    order = load_order(infos, ["virtio_net", "virtio_pci"])
    print("computed order:", " ".join(order))
    assert sorted(order) == sorted(DOC_ORDER)
    assert_topological(order, infos)
    assert_topological(DOC_ORDER, infos)
