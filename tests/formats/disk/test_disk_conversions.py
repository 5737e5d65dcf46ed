"""The raw disk's conversions (aws, gcp, vhd, dynamic-vhd, vmdk) and tar-kernel-initrd:
their structure, checked with the real qemu-img and GNU tar; what qemu-img stamps and
forge fixes; how `linuxkit_image` plans them; how each boots (boot_spec). A small
synthetic disk is enough here: test_disk_images.py rebuilds real ones byte for byte and
test_redisos.py boots them."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import struct
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from conftest import require
from test_linuxkit import BUILD, lk  # noqa: F401 (fixture: a workspace with a stand-in kernel)
from forge.formats.disk import convert, gcp, kernel_tar, sparse_tar, vhd, vmdk
from forge.formats.disk import tools as disk_tools
from forge.formats.disk.errors import DiskImageError

EPOCH = 1700000000  # 2023-11-14T22:13:20Z
MIB = 1 << 20


def _raw(path: Path, seed: int = 1) -> Path:
    """An 8 MiB "disk": data in its first and last 2 MiB (a VHD block), holes between."""
    with open(path, "wb") as f:
        f.write(bytes([seed]) * 1000 + b"MBR".ljust(24, b"\0"))
        f.seek(MIB + 700)
        f.write(bytes(range(256)) * 40)
        f.seek(8 * MIB - 3000)
        f.write(b"\xff" * 3000)
    return path


def _qemu_img() -> str:
    found = shutil.which("qemu-img")
    require(found is not None, "qemu-img is not installed (qemu-utils)")
    return found


def _back_to_raw(image: Path, fmt: str, tmp: Path) -> bytes:
    out = tmp / f"{image.name}.back.raw"
    subprocess.run([_qemu_img(), "convert", "-f", fmt, "-O", "raw", image, out], check=True)
    return out.read_bytes()


def _info(image: Path, fmt: str) -> dict:
    # -f: qemu-img's probe finds a fixed VHD's footer only at the start, and calls it raw
    return json.loads(subprocess.run([_qemu_img(), "info", "-f", fmt, "--output=json", image],
                                     capture_output=True, text=True, check=True).stdout)


# --- VHD -------------------------------------------------------------------------------

@pytest.mark.real
@pytest.mark.parametrize("fmt", ["vhd", "dynamic-vhd"])
def test_vhd_holds_the_disk_with_fixed_time_and_id(fmt, tmp_path):
    _qemu_img()
    raw = _raw(tmp_path / "disk.img")
    [out] = convert.build(fmt, raw=raw, name="demo", outdir=tmp_path / "o", workdir=tmp_path / "w",
                          epoch=EPOCH)
    assert out.name == "demo.vhd"
    info = _info(out, "vpc")
    assert info["format"] == "vpc" and info["virtual-size"] == raw.stat().st_size
    assert _back_to_raw(out, "vpc", tmp_path) == raw.read_bytes()
    data = out.read_bytes()
    footers = [data[-512:]] + ([data[:512]] if fmt == "dynamic-vhd" else [])
    for f in footers:
        assert f[:8] == b"conectix" and f[28:32] == b"qem2"  # force_size: the exact size
        assert struct.unpack_from(">I", f, 24)[0] == EPOCH - vhd.VHD_EPOCH
        assert uuid.UUID(bytes=f[68:84]) == convert.content_id(raw, "demo", fmt)
        assert struct.unpack_from(">I", f, 64)[0] == vhd.checksum(f)
        assert struct.unpack_from(">I", f, 60)[0] == (vhd.DYNAMIC if fmt == "dynamic-vhd" else vhd.FIXED)
    if fmt == "vhd":
        assert len(data) == raw.stat().st_size + 512 and data[:-512] == raw.read_bytes()
    else:
        assert len(data) < raw.stat().st_size - 3 * MIB  # 2 of its 4 blocks are holes


@pytest.mark.real
def test_qemu_img_stamps_random_ids_which_forge_fixes(tmp_path):
    """Two plain qemu-img conversions differ (VHD: its time and id; VMDK: its CID); after
    forge's fixes they are the same bytes, and another content gets another id."""
    raw = _raw(tmp_path / "disk.img")
    env = disk_tools.tool_env(tmp_path, EPOCH)
    disk_id = uuid.UUID(int=7)
    for sub, fmt, opts in (("vhd", "vpc", "subformat=dynamic,force_size"),
                           ("vmdk", "vmdk", vmdk.OPTIONS)):
        made = []
        for d in ("a", "b"):
            (tmp_path / d).mkdir(exist_ok=True)
            made.append(tmp_path / d / f"x.{sub}")
            disk_tools.run([_qemu_img(), "convert", "-f", "raw", "-O", fmt, "-o", opts, raw,
                            made[-1]], env)
        assert made[0].read_bytes() != made[1].read_bytes(), sub
        for m in made:
            if sub == "vhd":
                vhd.fix_footers(m, disk_id=disk_id, epoch=EPOCH)
            else:
                vmdk.fix_cid(m, 0x1234abcd)
        assert made[0].read_bytes() == made[1].read_bytes(), sub
    one = convert.build("dynamic-vhd", raw=raw, name="n", outdir=tmp_path / "1",
                        workdir=tmp_path / "w1", epoch=EPOCH)[0]
    other = convert.build("dynamic-vhd", raw=_raw(tmp_path / "other.img", seed=2), name="n",
                          outdir=tmp_path / "3", workdir=tmp_path / "w3", epoch=EPOCH)[0]
    assert other.read_bytes()[-512 + 68:-512 + 84] != one.read_bytes()[-512 + 68:-512 + 84]


# --- VMDK ------------------------------------------------------------------------------

@pytest.mark.real
def test_vmdk_is_stream_optimised_for_lsilogic_with_a_content_cid(tmp_path):
    _qemu_img()
    raw = _raw(tmp_path / "disk.img")
    [out] = convert.build("vmdk", raw=raw, name="demo", outdir=tmp_path / "o",
                          workdir=tmp_path / "w", epoch=EPOCH)
    assert out.name == "demo.vmdk"
    _, _, text = vmdk.descriptor(out)
    cid = convert.content_id(raw, "demo", "vmdk").int & 0xFFFFFFFF
    assert f"\nCID={cid:08x}\n" in text
    for line in ('createType="streamOptimized"', 'RW 16384 SPARSE "demo.vmdk"',
                 'ddb.adapterType = "lsilogic"', 'ddb.virtualHWVersion = "6"'):
        assert line in text, text
    info = _info(out, "vmdk")
    assert info["format"] == "vmdk" and info["virtual-size"] == raw.stat().st_size
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert _back_to_raw(out, "vmdk", tmp_path) == raw.read_bytes()
    subprocess.run([_qemu_img(), "check", "-f", "vmdk", out], check=True, capture_output=True)


# --- GCP -------------------------------------------------------------------------------

_SPARSE_CASES = {
    "empty": ([], MIB),
    "data-then-hole": ([(0, b"a" * 1000)], MIB),
    "ends-in-data": ([(0, b"a" * 1000), (1049576, b"b" * 512)], 1050088),
    "partial-last-block": ([(0, b"z" * 600), (MIB + 10, b"q" * 3000)], MIB + 3010),
    "extension-blocks": ([(i * 4096, b"y" * 700) for i in range(100)], 100 * 4096 + MIB),
}


@pytest.mark.real
@pytest.mark.parametrize("case", sorted(_SPARSE_CASES))
def test_sparse_tar_is_what_gnu_tar_writes(case, tmp_path):
    """GNU tar's raw hole detection maps holes by content, as forge's writer does; GNU tar
    only looks for holes in a file stored sparse, as these are."""
    require(shutil.which("tar") is not None, "GNU tar is not installed")
    writes, size = _SPARSE_CASES[case]
    src = tmp_path / "disk.raw"
    with open(src, "wb") as f:
        for off, data in writes:
            f.seek(off)
            f.write(data)
        f.truncate(size)
    assert src.stat().st_blocks * 512 < size
    subprocess.run(["tar", "--format=oldgnu", "--sparse", "--hole-detection=raw",
                    f"--mtime=@{EPOCH}", "--owner=0", "--group=0", "--numeric-owner",
                    "--mode=0644", "-C", tmp_path, "-cf", tmp_path / "gnu.tar", "disk.raw"],
                   check=True)
    ours = io.BytesIO()
    sparse_tar.write(ours, src, "disk.raw", size=size, mtime=EPOCH)
    assert ours.getvalue() == (tmp_path / "gnu.tar").read_bytes()


@pytest.mark.real
def test_gcp_is_disk_raw_in_whole_gib_in_a_sparse_oldgnu_tar_gz(tmp_path):
    raw = _raw(tmp_path / "disk.img")
    [out] = convert.build("gcp", raw=raw, name="demo", outdir=tmp_path / "o", workdir=tmp_path / "w",
                          epoch=EPOCH)
    assert out.name == "demo.img.tar.gz"
    head = out.read_bytes()[:10]
    assert head[:3] == b"\x1f\x8b\x08" and head[3] == 0 and head[4:8] == bytes(4)  # no name, no time
    assert out.stat().st_size < 200_000  # the GiB of padding is a hole, not data
    with tarfile.open(out, "r:gz") as tf:
        [m] = tf.getmembers()
        assert (m.name, m.size, m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == \
            ("disk.raw", gcp.GIB, EPOCH, 0o644, 0, 0, "", "")
        assert m.issparse() and m.type == tarfile.GNUTYPE_SPARSE
    with gzip.open(out) as z:
        assert z.read(512)[257:265] == b"ustar  \0"  # the old GNU magic, as --format=oldgnu
    listing = subprocess.run(["tar", "-tvzf", out], capture_output=True, text=True, check=True).stdout
    assert listing.split()[2:3] == [str(gcp.GIB)] and listing.rstrip().endswith(" disk.raw")
    (tmp_path / "x").mkdir()
    disk = gcp.unpack(out, tmp_path / "x")
    st = disk.stat()
    assert st.st_size == gcp.GIB and st.st_blocks * 512 < 16 * MIB  # holes stay holes
    with open(disk, "rb") as f:
        assert f.read(raw.stat().st_size) == raw.read_bytes()
        f.seek(gcp.GIB - 4096)
        assert f.read() == bytes(4096)
    (tmp_path / "gnu").mkdir()
    subprocess.run(["tar", "-xzf", out, "-C", tmp_path / "gnu"], check=True)
    with open(tmp_path / "gnu/disk.raw", "rb") as f:
        assert f.read(raw.stat().st_size) == raw.read_bytes()


def test_a_broken_gcp_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.img.tar.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(DiskImageError, match="cannot be read as a GCE image archive"):
        gcp.unpack(bad, tmp_path)
    with tarfile.open(bad, "w:gz") as tf:
        ti = tarfile.TarInfo("other.raw")
        tf.addfile(ti, io.BytesIO())
    with pytest.raises(DiskImageError, match="holds no file disk.raw"):
        gcp.unpack(bad, tmp_path)


# --- aws, tar-kernel-initrd, tools ------------------------------------------------------

def test_aws_is_the_raw_disk_kept_sparse(tmp_path):
    raw = _raw(tmp_path / "disk.img")
    [out] = convert.build("aws", raw=raw, name="demo", outdir=tmp_path / "o", workdir=tmp_path / "w",
                          epoch=EPOCH)
    assert out.name == "demo.raw" and out.read_bytes() == raw.read_bytes()
    assert out.stat().st_blocks * 512 < out.stat().st_size


@pytest.mark.parametrize("ucode", [False, True])
def test_tar_kernel_initrd_is_linuxkits_layout(ucode, tmp_path):
    files = {"kernel": b"K" * 3000, "initrd": b"I" * 5000, "cmdline": b"console=ttyS0", "ucode": b"U" * 70}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = kernel_tar.write(tmp_path / "N-initrd.tar", kernel=tmp_path / "kernel",
                           initrd=tmp_path / "initrd", cmdline=tmp_path / "cmdline",
                           ucode=tmp_path / "ucode" if ucode else None, epoch=EPOCH)
    with tarfile.open(out) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == ["kernel", "initrd.img", "cmdline"] + (["ucode.cpio"] if ucode else [])
        assert {(m.mode, m.mtime, m.uid, m.gid, m.uname, m.gname, m.type) for m in members} == \
            {(0o644, EPOCH, 0, 0, "", "", tarfile.REGTYPE)}
        assert tf.extractfile("initrd.img").read() == files["initrd"]
        assert tf.extractfile("cmdline").read() == files["cmdline"]
    assert out.read_bytes()[257:263] == b"ustar\0"  # POSIX, no pax records needed


def test_a_missing_qemu_img_names_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(disk_tools, "_SEARCH", ())
    for fmt in ("vhd", "dynamic-vhd", "vmdk"):
        with pytest.raises(DiskImageError, match="qemu-img is not installed: install the "
                           "Debian package qemu-utils"):
            convert.tools(fmt)
    assert convert.tools("aws") == [] and convert.tools("gcp") == []
    raw = _raw(tmp_path / "disk.img")
    with pytest.raises(DiskImageError, match="qemu-img is not installed"):
        convert.build("vmdk", raw=raw, name="n", outdir=tmp_path / "o", workdir=tmp_path / "w",
                      epoch=EPOCH)
    assert not (tmp_path / "o" / "n.vmdk").exists()
    with pytest.raises(DiskImageError, match="unknown disk conversion 'vhdx'; known: aws"):
        convert.tools("vhdx")


# --- planning in linuxkit_image, and booting ----------------------------------------------

def _plan(root: Path, label: str):
    from forge.analysis import Analyzer
    from forge.labels import parse_pattern
    from forge.workspace import Workspace
    an = Analyzer(Workspace(root))
    return an.analyze(an.expand([parse_pattern(label)]))


def _with_formats(lk, formats: list[str]) -> None:
    (lk.root / "BUILD").write_text(BUILD.replace('["kernel+initrd", "tar"]', json.dumps(formats)))


@pytest.mark.real
def test_conversions_share_one_raw_disk_action(lk):
    for tool in ("sfdisk", "syslinux", "mkfs.vfat", "qemu-img"):
        require(shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is not None,
                f"{tool} is not installed (see dev/setup.sh)")
    # a conversion before raw-bios, and one after: still one LkDisk for the raw disk
    _with_formats(lk, ["vmdk", "gcp", "raw-bios", "aws", "tar-kernel-initrd"])
    actions = [a for a in _plan(lk.root, "//:os").actions if a.mnemonic in ("LkDisk", "LkConvert",
                                                                           "LkKernelTar")]
    [disk] = [a for a in actions if a.mnemonic == "LkDisk"]
    assert disk.params["format"] == "raw-bios" and [o.path for o in disk.outputs] == ["forge-out/os-bios.img"]
    conv = {a.params["format"]: a for a in actions if a.mnemonic == "LkConvert"}
    assert sorted(conv) == ["aws", "gcp", "vmdk"]
    assert all(a.inputs == disk.outputs for a in conv.values())
    assert [Path(t).name for t in conv["vmdk"].tools] == ["qemu-img"] and conv["aws"].tools == ()
    assert conv["gcp"].params["compressor"].startswith("zlib ")
    [ktar] = [a for a in actions if a.mnemonic == "LkKernelTar"]
    assert [o.path for o in ktar.outputs] == ["forge-out/os-initrd.tar"]


@pytest.mark.real
def test_adding_a_format_runs_only_its_action(lk):
    for tool in ("sfdisk", "syslinux", "mkfs.vfat", "qemu-img"):
        require(shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is not None,
                f"{tool} is not installed (see dev/setup.sh)")
    _with_formats(lk, ["kernel+initrd", "raw-bios"])
    assert lk.build("//:os").code == 0
    for fmt, ran in (("vmdk", [("LkConvert", "os.vmdk")]),
                     ("tar-kernel-initrd", [("LkKernelTar", "os-initrd.tar")])):
        _with_formats(lk, ["kernel+initrd", "raw-bios", fmt])
        r = lk.build("//:os")
        assert r.code == 0, r.err
        assert sorted((e["mnemonic"], Path(e["outputs"][0]).name) for e in r.event_list
                      if e.get("status") == "executed") == ran
    with tarfile.open(lk.root / "forge-out/os-initrd.tar") as tf:
        for member, built in (("kernel", "os-kernel"), ("initrd.img", "os-initrd.img"),
                              ("cmdline", "os-cmdline")):
            assert tf.extractfile(member).read() == (lk.root / "forge-out" / built).read_bytes()


@pytest.mark.parametrize("fmt,kind,efi,image_format", [
    ("iso-efi", "iso", True, "raw"), ("iso-efi-initrd", "iso", True, "raw"),
    ("aws", "disk", False, "raw"), ("vhd", "disk", False, "vpc"),
    ("dynamic-vhd", "disk", False, "vpc"), ("vmdk", "disk", False, "vmdk"),
])
def test_how_each_format_boots(fmt, kind, efi, image_format, tmp_path):
    from forge.formats.vm import machine
    from rules.qemu import BOOTABLE, boot_spec
    assert fmt in BOOTABLE
    boot = boot_spec(fmt, [tmp_path / "image"], tmp_path)
    assert (boot.kind, boot.efi, boot.image_format) == (kind, efi, image_format)
    if fmt.startswith("iso"):  # a hybrid: also a disk
        assert boot_spec(fmt, [tmp_path / "image"], tmp_path, "disk") == \
            machine.Boot("disk", efi=True, image=tmp_path / "image", image_format="raw")
    argv = machine.qemu_argv(boot, accel="tcg", efi_vars=tmp_path / "vars")
    if kind == "disk":
        assert f"file={tmp_path / 'image'},format={image_format},if=virtio,snapshot=on" in argv
    assert ("-machine" in argv) == efi


def test_gcp_boots_its_disk_raw_unpacked_into_the_run_directory(tmp_path):
    from rules.qemu import boot_spec
    raw = _raw(tmp_path / "disk.img")
    [archive] = convert.build("gcp", raw=raw, name="demo", outdir=tmp_path / "o",
                              workdir=tmp_path / "w", epoch=EPOCH)
    (tmp_path / "run").mkdir()
    boot = boot_spec("gcp", [archive], tmp_path / "run")
    assert (boot.kind, boot.efi, boot.image_format) == ("disk", False, "raw")
    assert boot.image == tmp_path / "run" / "disk.raw" and boot.image.stat().st_size == gcp.GIB
