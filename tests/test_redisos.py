"""RedisOS end to end (examples/images): built from a real Debian mirror, a real Docker
engine and Debian's cloud kernel, booted under QEMU until Redis answers PING through a
forwarded port, in every bootable format (BOOTED); `forge run` with Ctrl-C;
and what a one-service change reruns."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from boot_fixture import make_test_key
from conftest import Workspace, require
from registry_fixture import free_port
from test_images import engine_ok
from rules.disk import FORMATS as _DISK_FORMATS

pytestmark = pytest.mark.real
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def redisos(tmp_path_factory):
    for tool in ("mmdebstrap", "qemu-system-x86_64", "xorriso", "qemu-img", "runc"):
        require(shutil.which(tool) is not None, f"{tool} is not installed (see dev/setup.sh)")
    require(engine_ok(), "no Docker engine answers (dev/setup.sh starts dockerd)")
    root = tmp_path_factory.mktemp("redisos") / "ws"
    root.mkdir()
    shutil.copy(REPO / "examples/forge.toml", root / "forge.toml")
    shutil.copytree(REPO / "examples/images", root / "images",
                    ignore=shutil.ignore_patterns("forge-out"))
    with open(root / "images/BUILD", "a") as f:
        f.write(ALL_FORMATS_BUILD)
    w = Workspace(root, root.parent / "cache")
    r = w.build("//images:redisos", timeout=1800)
    assert r.code == 0, r.err
    return w


# format -> its boot test's timeout. Every format QEMU can boot, each one test of its own,
# all from linuxkit_images of one assembly, so the fragments are built once for all of them.
# The three formats of examples/images are booted by its own tests
# (test_boots_to_pong_in_three_formats). "F/disk" boots the ISO format F as a disk
# (qemu_test's drive = "disk"), as a USB stick holding it: the hybrid. aws, gcp, vhd,
# dynamic-vhd and vmdk boot by BIOS, as LinuxKit's do.
BOOTED = {
    "iso-efi": "240s",
    "iso-efi/disk": "240s",
    "iso-efi-initrd": "240s",
    "raw-bios": "180s",
    "raw-efi": "240s",
    "qcow2-efi": "240s",
    "kernel+squashfs": "180s",
    "kernel+erofs": "180s",
    "kernel+iso": "180s",
    "aws": "180s",
    "gcp": "180s",
    "vhd": "180s",
    "dynamic-vhd": "180s",
    "vmdk": "180s",
}
# A verified root (verity = True, docs/supply-chain.md): each root-image format that can
# have one, from its own linuxkit_image (N-cmdline is that image's), on the same assembly
# with the kernel that keeps dm_verity (examples/images/redisos-verity.yml).
VERITY = {"kernel+erofs": "180s", "kernel+squashfs": "180s"}
# Formats that write the same file as one above (dynamic-vhd and vhd: N.vhd) are built by
# a second image of the same assembly.
SECOND = {"dynamic-vhd"}
_FORMATS = sorted({k.split("/")[0] for k in BOOTED})

ALL_FORMATS_BUILD = f"""
linuxkit_image(
    name = "redisos_all",
    assembly = "redisos.yml",
    images = {{"redis": "//images/redis:image"}},
    formats = {[f for f in _FORMATS if f not in SECOND]!r},
)
linuxkit_image(
    name = "redisos_all2",
    assembly = "redisos.yml",
    images = {{"redis": "//images/redis:image"}},
    formats = {sorted(SECOND)!r},
)
[qemu_test(
    name = "boot_" + key.replace("/", "_"),
    image = ":redisos_all2" if key in {sorted(SECOND)!r} else ":redisos_all",
    format = key.split("/")[0],
    drive = "disk" if key.endswith("/disk") else "default",
    forward = {{6379: 6379}},
    probe = redis_ping(),
    timeout = timeout,
) for key, timeout in {sorted(BOOTED.items())!r}]
[linuxkit_image(
    name = "redisos_verity_" + fmt.split("+")[1],
    assembly = "redisos.yml",
    overlays = ["redisos-verity.yml"],
    images = {{"redis": "//images/redis:image"}},
    formats = [fmt],
    verity = True,
) for fmt in {sorted(VERITY)!r}]
[qemu_test(
    name = "boot_verity_" + fmt.split("+")[1],
    image = ":redisos_verity_" + fmt.split("+")[1],
    format = fmt,
    forward = {{6379: 6379}},
    probe = redis_ping(),
    timeout = timeout,
) for fmt, timeout in {sorted(VERITY.items())!r}]
"""


@pytest.mark.parametrize("fmt", sorted(BOOTED))
def test_each_format_boots_to_pong(redisos, fmt):
    r = redisos.forge("test", f"//images:boot_{fmt.replace('/', '_')}", timeout=900)
    assert r.code == 0, r.out + r.err
    assert "PASSED" in r.out, r.out


@pytest.mark.parametrize("fmt", sorted(VERITY))
def test_a_verified_root_boots_to_pong(redisos, fmt):
    r = redisos.forge("test", f"//images:boot_verity_{fmt.split('+')[1]}", timeout=900)
    assert r.code == 0, r.out + r.err
    assert "PASSED" in r.out, r.out
    cmdline = (redisos.root / f"forge-out/images/redisos_verity_{fmt.split('+')[1]}-cmdline").read_text()
    assert re.search(r'dm-mod\.create="vroot,,,ro,0 \d+ verity 1 /dev/vda /dev/vda 4096 4096 \d+ \d+ '
                     r'sha256 [0-9a-f]{64} [0-9a-f]{64}" root=/dev/dm-0$', cmdline), cmdline


def test_a_changed_byte_in_the_verified_root_is_an_io_error_not_altered_code(redisos, tmp_path):
    """The erofs image (uncompressed, so a file's blocks are where dump.erofs says) with
    one byte of redis-server's first block changed: the kernel refuses that block, the
    service cannot start, and Redis never answers."""
    from forge.formats.vm import machine as qemu
    from forge.formats.vm.errors import BootTimeout
    from forge.formats.vm.probe import console_regex, redis_ping
    require(shutil.which("dump.erofs") is not None, "dump.erofs is not installed (erofs-utils)")
    r = redisos.build("//images:redisos_verity_erofs", timeout=900)
    assert r.code == 0, r.err
    out = redisos.root / "forge-out/images"
    image = out / "redisos_verity_erofs-erofs.img"
    found = subprocess.run(["dump.erofs", "--path=/containers/services/redis/lower/usr/bin/redis-server",
                            "-e", image], capture_output=True, text=True, check=True).stdout
    start = int(re.search(r"^\s*0:\s*0\.\.\s*\d+\s*\|\s*\d+\s*:\s*(\d+)\.\.", found, re.M).group(1))
    changed = tmp_path / "changed.img"
    shutil.copyfile(image, changed)
    with open(changed, "r+b") as f:
        f.seek(start + 1000)
        byte = f.read(1)
        f.seek(start + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    spec = qemu.kernel_boot(out / "redisos_verity_erofs-kernel",
                            out / "redisos_verity_erofs-boot-initrd.img",
                            (out / "redisos_verity_erofs-cmdline").read_text(), drive=changed)
    with qemu.VM(spec, tmp_path / "run", forwards={6379: 0}) as vm:
        vm.wait(console_regex(rf"device-mapper: verity: 254:0: data block {start // 4096} is corrupted"),
                timeout=240)
        with pytest.raises(BootTimeout):  # the service has failed: nothing answers
            vm.wait(redis_ping("127.0.0.1", vm.host_port(6379)), timeout=20)
        tail = vm.console_tail(300)
    assert "through dm-verity" in tail and "Ready to accept connections" not in tail, tail
    print(tail)


UKI_VERITY_BUILD = """
uki_stub(name = "uki_stub")
linuxkit_image(
    name = "redisos_verity_uki",
    assembly = "redisos.yml",
    overlays = ["redisos-verity.yml"],
    images = {"redis": "//images/redis:image"},
    formats = ["uki", "kernel+erofs"],
    verity = True,
    uki_stub = ":uki_stub",
)
"""


@pytest.mark.skipif("uki" not in _DISK_FORMATS, reason="this tree has no uki format (branch uki adds it)")
def test_a_uki_beside_a_verified_root_embeds_its_root_hash_and_boots_to_pong(redisos):
    """With verity, a UKI of the same target is the kernel, the boot initrd and the verity
    N-cmdline: booted by UEFI with the erofs image as its only disk, it opens the root
    through dm-verity."""
    import pefile
    from forge.formats.vm import machine as qemu
    from forge.formats.vm.probe import redis_ping
    try:
        qemu.ovmf_firmware()
    except Exception as e:  # QemuError: OVMF is not installed
        require(False, str(e))
    build = redisos.root / "images/BUILD"
    original = build.read_text()
    build.write_text(original + UKI_VERITY_BUILD)
    try:
        r = redisos.build("//images:redisos_verity_uki", timeout=900)
    finally:
        build.write_text(original)
    assert r.code == 0, r.err
    out = redisos.root / "forge-out/images"
    pe = pefile.PE(str(out / "redisos_verity_uki.efi"))
    sections = {s.Name.rstrip(b"\0").decode(): s.get_data()[:s.Misc_VirtualSize] for s in pe.sections}
    cmdline = (out / "redisos_verity_uki-cmdline").read_text()
    assert "dm-mod.create=" in cmdline and sections[".cmdline"].rstrip(b"\0").decode().strip() == cmdline.strip()
    assert sections[".initrd"] == (out / "redisos_verity_uki-boot-initrd.img").read_bytes()
    spec = qemu.Boot("kernel", efi=True, kernel=out / "redisos_verity_uki.efi",
                     drive=out / "redisos_verity_uki-erofs.img")
    with qemu.VM(spec, redisos.root.parent / "uki-run", memory=512, forwards={6379: 0}) as vm:
        vm.wait(redis_ping("127.0.0.1", vm.host_port(6379)), timeout=300)
        tail = vm.console_tail(300)
    assert "through dm-verity" in tail, tail


def test_boots_to_pong_in_three_formats(redisos):
    r = redisos.forge("test", "//images:boot_test", "//images:boot_test_iso",
                      "//images:boot_test_qcow2", "--junit", str(redisos.root.parent / "junit.xml"),
                      timeout=900)
    assert r.code == 0, r.out + r.err
    assert r.out.count("PASSED") == 3, r.out
    assert "failures=\"0\"" in (redisos.root.parent / "junit.xml").read_text()


def test_tcp_expect_and_console_regex_probes(redisos):
    build = redisos.root / "images/BUILD"
    original = build.read_text()
    build.write_text(original + '''
qemu_test(
    name = "inline_ping",
    image = ":redisos",
    forward = {6379: 6379},
    probe = tcp_expect(6379, send = "PING\\r\\n", expect = "^[+]PONG"),
)
qemu_test(
    name = "console",
    image = ":redisos",
    probe = console_regex("redis: .*Ready to accept connections"),
)
''')
    try:
        r = redisos.forge("test", "//images:inline_ping", "//images:console", timeout=600)
        assert r.code == 0, r.out + r.err
        assert r.out.count("PASSED") == 2, r.out
    finally:
        build.write_text(original)


def test_a_probe_that_never_answers_fails_with_the_console_tail(redisos):
    (redisos.root / "images/BUILD").write_text((redisos.root / "images/BUILD").read_text() + '''
qemu_test(
    name = "wrong_port",
    image = ":redisos",
    forward = {6380: 6380},
    probe = redis_ping(port = 6380),
    timeout = "25s",
)
''')
    r = redisos.forge("test", "//images:wrong_port", timeout=300)
    assert r.code == 3, r.out + r.err
    assert "FAILED" in r.out and "(no redis PING on 127.0.0.1:" in r.out, r.out
    assert "redis: " in r.out  # the console's last lines follow
    assert subprocess.run(["pgrep", "-f", "qemu-system-x86_64.*redisos"], capture_output=True).returncode == 1


def test_one_service_change_reruns_its_fragment_segment_initrd_and_formats(redisos):
    yml = redisos.root / "images/redisos.yml"
    text = yml.read_text()
    yml.write_text(text.replace("    image: redis\n", "    image: redis\n    env: [\"CHANGED=1\"]\n"))
    try:
        r = redisos.build("//images:redisos")
        assert r.code == 0, r.err
        ran = sorted((e["mnemonic"], Path(e["outputs"][0]).name) for e in r.event_list
                     if e.get("status") == "executed")
        assert ran == [("LkBundle", "services-000-redis.tar"),
                       ("LkDisk", "redisos-efi.img"), ("LkDisk", "redisos.iso"),
                       ("LkDisk", "redisos.qcow2"), ("LkInitrd", "redisos-initrd.img"),
                       ("LkSegment", "003-services-redis.cpio.gz")], ran
    finally:
        yml.write_text(text)
    # back to the original assembly: every output comes from the cache, no Docker needed
    r = redisos.build("//images:redisos", env={"DOCKER_HOST": "unix:///nonexistent.sock"})
    assert r.code == 0 and r.event_list[-1]["executed"] == 0, r.err


def test_forge_run_boots_and_ctrl_c_stops_the_vm(redisos):
    port = free_port()
    pid, fd = pty.fork()
    if pid == 0:  # the child: forge run on a terminal, as a user types it
        os.chdir(redisos.root)
        os.execv(sys.executable, [sys.executable, "-m", "forge", "run", "//images:redisos",
                                  "--cache-dir", str(redisos.cache), "-p", f"{port}:6379"])
    out = b""
    try:
        deadline = time.monotonic() + 180
        pong = False
        while time.monotonic() < deadline and not pong:
            out += _read(fd, 0.5)
            pong = _ping(port)
        assert pong, out.decode(errors="replace")[-3000:]
        assert b"forge-init" in out  # the serial console is on the terminal
        os.write(fd, b"\x03")
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and status is None:
            out += _read(fd, 0.2)
            done, st = os.waitpid(pid, os.WNOHANG)
            status = os.waitstatus_to_exitcode(st) if done else None
        assert status == 0, out.decode(errors="replace")[-2000:]
        assert b"VM stopped" in out
        assert not _ping(port)
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _read(fd: int, wait: float) -> bytes:
    r, _, _ = select.select([fd], [], [], wait)
    try:
        return os.read(fd, 65536) if r else b""
    except OSError:
        return b""


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return b"+PONG" in s.recv(64)
    except OSError:
        return False


# The reference init acting on what LinuxKit's runtime and volumes ask for, in a real boot:
# a veth made into one entry's network namespace and that namespace bound at a path
# (runtime.json's interfaces and bindNS), a later entry joining it (net: <path>), and two
# volumes bound by name, one writable, one read-only.
RUNTIME_YML = """\
kernel:
  image: //images:kernel_veth
  cmdline: "console=ttyS0 panic=1 forge.net=none"
init:
  - //images/init:init
onboot:
  - name: maker
    image: //images/init:init
    readonly: true
    net: new
    command: ["/bin/busybox", "ip", "link", "show", "vc0"]
    runtime:
      interfaces:
        - name: vc0
          peer: vh0
      bindNS:
        net: /run/netns/c1
  - name: joiner
    image: //images/init:init
    readonly: true
    net: /run/netns/c1
    binds:
      - rw:/rw
      - ro:/ro:ro
    command: ["/bin/busybox", "sh", "-c", "b=/bin/busybox; $b ip link show vc0 && [ -x /ro/bin/busybox ] && echo x >/rw/f && ! $b touch /ro/f && echo LK-RUNTIME-OK"]
volumes:
  - name: rw
  - name: ro
    image: //images/init:init
    format: filesystem
    readonly: true
"""


def test_runtime_interfaces_bind_ns_and_volumes_in_a_boot(redisos):
    (redisos.root / "images/lkruntime.yml").write_text(RUNTIME_YML)
    build = redisos.root / "images/BUILD"
    original = build.read_text()
    build.write_text(original + '''
kernel(
    name = "kernel_veth",
    package = "linux-image-cloud-amd64",
    modules = ["virtio_net", "virtio_pci", "overlay", "veth"],
)
linuxkit_image(name = "lkruntime", assembly = "lkruntime.yml")
qemu_test(
    name = "lkruntime_boot",
    image = ":lkruntime",
    probe = console_regex("joiner: LK-RUNTIME-OK"),
    timeout = "120s",
)
''')
    try:
        r = redisos.forge("test", "//images:lkruntime_boot", timeout=900)
        assert r.code == 0, r.out + r.err
        assert "PASSED" in r.out, r.out
    finally:
        build.write_text(original)


# Secure Boot: RedisOS as a unified kernel image on the ESP of raw-efi (efi_boot = "uki"),
# signed with a test db key made here; OVMF enforcing Secure Boot with its certificate
# enrolled boots it to PONG and refuses the same image unsigned.
SECURE_BOOT_BUILD = '''
uki_stub(name = "uki_stub")
[linuxkit_image(
    name = name,
    assembly = "redisos.yml",
    images = {"redis": "//images/redis:image"},
    formats = ["raw-efi"],
    efi_boot = "uki",
    uki_stub = ":uki_stub",
    secure_boot_key = key,
) for name, key in [("redisos_sb", ["db.key", "db.crt"]), ("redisos_sb_unsigned", [])]]
qemu_test(
    name = "secure_boot_pong",
    image = ":redisos_sb",
    format = "raw-efi",
    forward = {6379: 6379},
    probe = redis_ping(),
    secure_boot_vars = "db.crt",
    timeout = "300s",
)
qemu_test(
    name = "secure_boot_refuses_unsigned",
    image = ":redisos_sb_unsigned",
    format = "raw-efi",
    probe = console_regex("BdsDxe: failed to load Boot.*(Access Denied|Security Violation)"),
    secure_boot_vars = "db.crt",
    timeout = "240s",
)
'''


def test_secure_boot_signed_uki_boots_to_pong_and_unsigned_is_refused(redisos):
    require(shutil.which("sbsign") is not None, "sbsign is not installed (sbsigntool)")
    make_test_key(redisos.root / "images")
    build = redisos.root / "images/BUILD"
    original = build.read_text()
    build.write_text(original + SECURE_BOOT_BUILD)
    try:
        r = redisos.forge("test", "//images:secure_boot_pong",
                          "//images:secure_boot_refuses_unsigned", timeout=1200)
        assert r.code == 0, r.out + r.err
        assert r.out.count("PASSED") == 2, r.out
        r = redisos.forge("run", "//images:redisos", "--format", "iso-bios",
                          "--secure-boot", "images/db.crt", timeout=300)
        assert r.code == 2, r.out + r.err
        assert "--secure-boot needs a UEFI boot; iso-bios is not an EFI format" in r.err, r.err
        assert "--format raw-efi" in r.err
    finally:
        build.write_text(original)


# Issue 14: the verified root's hash on the kernel command line, inside the signed UKI when
# Secure Boot is on. The hash is only trusted because the firmware checked the signature
# over the .cmdline that carries it, so this boots the signed UKI with Secure Boot enforcing.
SB_VERITY_BUILD = """
uki_stub(name = "uki_stub")
linuxkit_image(
    name = "redisos_sb_verity",
    assembly = "redisos.yml",
    overlays = ["redisos-verity.yml"],
    images = {"redis": "//images/redis:image"},
    formats = ["uki", "kernel+erofs"],
    verity = True,
    uki_stub = ":uki_stub",
    secure_boot_key = ["db.key", "db.crt"],
)
"""


@pytest.mark.skipif("uki" not in _DISK_FORMATS, reason="this tree has no uki format (branch uki adds it)")
def test_a_signed_uki_with_a_verified_root_boots_to_pong_under_secure_boot(redisos):
    import pefile
    from forge.formats.vm import machine as qemu
    from forge.formats.vm import secureboot
    from forge.formats.vm.probe import redis_ping
    require(shutil.which("sbsign") is not None and shutil.which("sbverify") is not None,
            "sbsign/sbverify are not installed (sbsigntool)")
    try:
        secureboot.secure_firmware()
        secureboot.virt_fw_vars()
    except Exception as e:  # QemuError: no Secure Boot OVMF or virt-fw-vars
        require(False, str(e))
    _key, cert = make_test_key(redisos.root / "images")
    build = redisos.root / "images/BUILD"
    original = build.read_text()
    build.write_text(original + SB_VERITY_BUILD)
    try:
        r = redisos.build("//images:redisos_sb_verity", timeout=900)
    finally:
        build.write_text(original)
    assert r.code == 0, r.err
    out = redisos.root / "forge-out/images"
    uki = out / "redisos_sb_verity.efi"
    # Signed by the db key: the signature covers the .cmdline below.
    v = subprocess.run(["sbverify", "--cert", str(cert), str(uki)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    pe = pefile.PE(str(uki))
    sections = {s.Name.rstrip(b"\0").decode(): s.get_data()[:s.Misc_VirtualSize] for s in pe.sections}
    embedded = sections[".cmdline"].rstrip(b"\0").decode().strip()
    assert re.search(r'dm-mod\.create="vroot,,,ro,0 \d+ verity 1 /dev/vda /dev/vda 4096 4096 \d+ \d+ '
                     r'sha256 [0-9a-f]{64} [0-9a-f]{64}', embedded), embedded
    assert embedded == (out / "redisos_sb_verity-cmdline").read_text().strip()
    rundir = redisos.root.parent / "sb-verity-run"
    store = secureboot.enrolled_vars(cert, rundir / "secure-boot-vars.fd")
    spec = secureboot.enforcing(qemu.Boot("kernel", efi=True, kernel=uki,
                                          drive=out / "redisos_sb_verity-erofs.img"), store)
    with qemu.VM(spec, rundir, memory=512, forwards={6379: 0}) as vm:
        vm.wait(redis_ping("127.0.0.1", vm.host_port(6379)), timeout=300)
        tail = vm.console_tail(300)
        console = Path(vm.console).read_text(errors="replace")
    assert "through dm-verity" in tail, tail
    # The kernel saw the firmware enforcing: the UKI was checked against db, not merely run.
    assert "Secure boot enabled" in console, console[:4000]
