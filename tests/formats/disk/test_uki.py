"""The uki format (a unified kernel image: systemd's stub from Debian's systemd-boot-efi,
fetched and verified by forge, with the kernel, initrd, command line and os-release as PE
sections) and Secure Boot: forge signs it with sbsign, and OVMF with the test certificate
enrolled and Secure Boot enforcing boots the signed image and refuses an unsigned or a
tampered one. The RedisOS boot to PONG under Secure Boot is in test_redisos.py."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pefile
import pytest

from boot_fixture import make_test_key
from conftest import Workspace, require
from forge.formats.debian.sources import debian_mirror, read_sources
from forge.formats.disk import sbsign, uki
from forge.formats.disk.errors import DiskImageError
from forge.formats.vm import machine as qemu
from forge.formats.vm import secureboot
from forge.formats.vm.errors import QemuError
from forge.formats.vm.probe import console_regex

MARKER = "FORGE-UKI-OK"
CMDLINE = "console=ttyS0 panic=-1"
INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo {MARKER}
/bin/busybox poweroff -f
"""
BUILD = """\
uki_stub(name = "stub")
kernel(name = "k", package = "linux-image-cloud-amd64", modules = [])
container_image(name = "init", srcs = ["Dockerfile", "init.sh", "busybox.bin"])
linuxkit_image(name = "signed", assembly = "u.yml", formats = ["uki", "raw-efi"],
               uki_stub = ":stub", efi_boot = "uki", secure_boot_key = ["db.key", "db.crt"])
linuxkit_image(name = "plain", assembly = "u.yml", formats = ["uki", "raw-efi"],
               uki_stub = ":stub", efi_boot = "uki")
"""
FILES = {
    "forge.toml": "",
    "BUILD": BUILD,
    "Dockerfile": "FROM scratch\nCOPY busybox.bin /bin/busybox\nCOPY init.sh /init\n",
    "init.sh": INIT,
    "u.yml": f'kernel:\n  image: ":k"\n  cmdline: "{CMDLINE}"\ninit:\n  - ":init"\n',
}


def _workspace(root: Path, key: Path, cert: Path) -> Workspace:
    root.mkdir(parents=True)
    ws = Workspace(root, root.parent / f"{root.name}-cache")
    ws.write(FILES)
    (root / "init.sh").chmod(0o755)
    shutil.copy("/bin/busybox", root / "busybox.bin")
    shutil.copy(key, root / "db.key")
    shutil.copy(cert, root / "db.crt")
    return ws


def _require_tools() -> None:
    require(debian_mirror(read_sources()) is not None, "no Debian mirror in the apt sources")
    require(Path("/bin/busybox").is_file(), "/bin/busybox is missing (busybox-static)")
    require(shutil.which("openssl") is not None, "openssl is not installed")
    try:
        sbsign.tools()
    except DiskImageError as e:
        require(False, str(e))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    _require_tools()
    return make_test_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, keys) -> Workspace:
    ws = _workspace(tmp_path_factory.mktemp("uki") / "one", *keys)
    t = time.monotonic()
    r = ws.build("//:signed", "//:plain", "//:k", timeout=900)
    assert r.code == 0, r.err
    print(f"forge build //:signed //:plain (uki, raw-efi): {time.monotonic() - t:.1f} s")
    return ws


def _sections(path: Path) -> dict[str, bytes]:
    pe = pefile.PE(str(path))
    return {s.Name.rstrip(b"\0").decode(): s.get_data()[:s.Misc_VirtualSize] for s in pe.sections}


@pytest.mark.real
def test_the_uki_holds_kernel_initrd_cmdline_and_os_release(built):
    out = built.root / "forge-out"
    secs = _sections(out / "plain.efi")
    assert secs[".linux"] == (out / "plain-kernel").read_bytes()
    assert secs[".initrd"] == (out / "plain-initrd.img").read_bytes()
    assert secs[".cmdline"] == CMDLINE.encode() + b"\0"
    assert b"ID=forge" in secs[".osrel"] and b'NAME="plain"' in secs[".osrel"]
    assert secs[".uname"].decode().endswith("-cloud-amd64")
    assert b"systemd-stub" in secs[".sdmagic"]  # the stub is systemd's, from the .deb
    # binutils reads the same sections back, and the PE checksum is right
    listing = subprocess.run(["objdump", "-h", out / "plain.efi"], capture_output=True,
                             text=True, check=True).stdout
    assert all(f" {s} " in listing for s in (".osrel", ".cmdline", ".initrd", ".linux"))
    pe = pefile.PE(str(out / "plain.efi"))
    assert pe.OPTIONAL_HEADER.CheckSum == pe.generate_checksum()


@pytest.mark.real
def test_the_signed_uki_verifies_with_the_certificate_and_the_plain_one_does_not(built, keys):
    out = built.root / "forge-out"
    ok = subprocess.run(["sbverify", "--cert", keys[1], out / "signed.efi"], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["sbverify", "--cert", keys[1], out / "plain.efi"], capture_output=True)
    assert bad.returncode != 0
    # the signed UKI is the plain one plus its signature: same image, same sections
    assert _sections(out / "signed.efi")[".linux"] == _sections(out / "plain.efi")[".linux"]


@pytest.mark.real
def test_a_clean_rebuild_elsewhere_is_byte_identical(built, keys, tmp_path):
    other = _workspace(tmp_path / "elsewhere" / "two", *keys)
    r = other.build("//:signed", timeout=900)
    assert r.code == 0, r.err
    for name in ("signed.efi", "signed-efi.img"):
        assert (other.root / "forge-out" / name).read_bytes() == \
            (built.root / "forge-out" / name).read_bytes(), name


@pytest.mark.real
def test_the_stub_is_pinned_in_forge_lock(built):
    import json
    pins = json.loads((built.root / "forge.lock").read_text())["pins"]["deb"]
    assert json.loads(pins["bookworm/amd64/systemd-boot-efi"])["Package"] == "systemd-boot-efi"


# --- Secure Boot in the firmware -----------------------------------------------------------

def _secure_boot(image: Path, cert: Path, rundir: Path, pattern: str, timeout: float) -> str:
    try:
        spec = qemu.disk_boot(image, efi=True)
        spec = secureboot.enforcing(spec, secureboot.enrolled_vars(cert, rundir / "vars.fd"))
        with qemu.VM(spec, rundir, memory=512) as vm:
            vm.wait(console_regex(pattern), timeout=timeout)
            return vm.console_tail()
    except QemuError as e:
        if "is not installed" in str(e) or "no UEFI firmware" in str(e):
            require(False, str(e))
        raise


# The firmware refusing the disk's loader (not the later boot options it tries and refuses too).
REFUSED = r"BdsDxe: failed to load Boot.*(Access Denied|Security Violation)"


@pytest.mark.real
def test_secure_boot_boots_the_signed_uki(built, keys, tmp_path):
    t = time.monotonic()
    tail = _secure_boot(built.root / "forge-out/signed-efi.img", keys[1], tmp_path, MARKER, 240)
    assert "Secure boot enabled" in tail or "secureboot" in tail or MARKER in tail
    print(f"Secure Boot, signed UKI: {time.monotonic() - t:.1f} s to {MARKER}")


@pytest.mark.real
def test_secure_boot_refuses_the_unsigned_uki(built, keys, tmp_path):
    tail = _secure_boot(built.root / "forge-out/plain-efi.img", keys[1], tmp_path, REFUSED, 180)
    assert MARKER not in tail


@pytest.mark.real
def test_secure_boot_refuses_a_tampered_uki(built, keys, tmp_path):
    disk = bytearray((built.root / "forge-out/signed-efi.img").read_bytes())
    cmdline = CMDLINE.encode() + b"\0"
    at = disk.find(cmdline)  # the UKI's .cmdline, inside the ESP's file
    assert at > 0 and disk.find(cmdline, at + 1) == -1
    disk[at + len(cmdline) - 2] ^= 0x01  # one byte of the signed command line
    tampered = tmp_path / "tampered.img"
    tampered.write_bytes(disk)
    tail = _secure_boot(tampered, keys[1], tmp_path / "vm", REFUSED, 180)
    assert MARKER not in tail


# --- the format's own checks (no network, no tools) ----------------------------------------

def test_a_stub_that_is_not_systemds_is_refused():
    with pytest.raises(DiskImageError, match="not a PE file"):
        uki.build(b"not a PE", kernel=b"MZ", initrd=b"", cmdline="x", osrel="")


def test_a_multi_line_cmdline_is_refused():
    with pytest.raises(DiskImageError, match="one line"):
        uki.build(b"", kernel=b"MZ", initrd=b"", cmdline="a\nb", osrel="")


def test_the_pe_checksum_matches_pefiles():
    data = bytearray(range(256)) * 9 + b"\x07"
    pe_sum = uki.pe_checksum(data)
    # the reference: the 16-bit one's-complement sum with carries folded, plus the length
    words = [int.from_bytes((data + b"\0")[i:i + 2], "little") for i in range(0, len(data), 2)]
    s = 0
    for w in words:
        s += w
        s = (s & 0xFFFF) + (s >> 16)
    assert pe_sum == s + len(data)


def test_kernel_release_reads_the_bzimage_header():
    k = bytearray(0x400)
    k[0x202:0x206] = b"HdrS"
    k[0x20E:0x210] = (0x100).to_bytes(2, "little")
    k[0x300:0x320] = b"6.1.0-9-cloud-amd64 (x@y) #1\0".ljust(32, b"\0")
    assert uki.kernel_release(bytes(k)) == "6.1.0-9-cloud-amd64"
    assert uki.kernel_release(b"MZ" + bytes(0x300)) is None


def test_uki_without_a_stub_names_the_rule_to_add(ws):
    ws.write({**FILES, "BUILD": BUILD.replace('uki_stub = ":stub", efi_boot = "uki")', ")"),
              "busybox.bin": "", "db.key": "", "db.crt": ""})
    r = ws.forge("build", "--nobuild", "//:plain")
    assert r.code == 2, r.err
    assert "a unified kernel image needs systemd's EFI stub" in r.err
    assert 'uki_stub(name = "uki_stub")' in r.err and "Traceback" not in r.err


def test_secure_boot_key_must_be_two_files(ws):
    ws.write({**FILES, "BUILD": BUILD.replace('["db.key", "db.crt"]', '["db.key"]'),
              "busybox.bin": "", "db.key": "", "db.crt": ""})
    r = ws.forge("build", "--nobuild", "//:signed")
    assert r.code == 2, r.err
    assert "secure_boot_key must name two files" in r.err and "Traceback" not in r.err


def test_a_key_that_is_not_pem_is_bad_input():
    with pytest.raises(DiskImageError, match="not a PEM private key"):
        sbsign.check_key(b"junk", b"-----BEGIN CERTIFICATE-----")
    with pytest.raises(DiskImageError, match="not a PEM certificate"):
        sbsign.check_key(b"-----BEGIN PRIVATE KEY-----", b"junk")


def test_secure_boot_vars_on_a_bios_or_kernel_boot_is_an_analysis_error(ws):
    build = BUILD.replace('formats = ["uki", "raw-efi"],\n               uki_stub = ":stub", efi_boot = "uki")',
                          'formats = ["uki", "raw-efi", "raw-bios"],\n'
                          '               uki_stub = ":stub", efi_boot = "uki")')
    ws.write({**FILES, "BUILD": build + 'qemu_test(name = "t", image = ":plain", format = "raw-bios",'
              ' secure_boot_vars = "db.crt")\n', "busybox.bin": "", "db.key": "", "db.crt": ""})
    r = ws.forge("build", "--nobuild", "//:t")
    assert r.code == 2, r.err
    assert "Secure Boot needs a UEFI boot; raw-bios boots by BIOS" in r.err, r.err
    assert "raw-efi" in r.err and "Traceback" not in r.err
