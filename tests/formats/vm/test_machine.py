"""QEMU: command lines, the accelerator choice, the probe loop against real TCP servers,
and real boots of the cloud kernel with the busybox initrd (TCG)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from boot_fixture import CMDLINE, MARKER, boot_initrd, busybox_initrd, cloud_kernel  # noqa: F401
from conftest import require
from forge.formats.vm.errors import BootTimeout, QemuError, VMExited
from forge.formats.vm.probe import console_regex, redis_ping, tcp_expect, wait_for
from forge.formats.vm import machine as qemu

# ---- command lines (pure) ------------------------------------------------------------------


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_kernel_boot_argv():
    argv = qemu.qemu_argv(qemu.kernel_boot(Path("/k/vmlinuz"), Path("/k/initrd.img"),
                                           "console=ttyS0 quiet"),
                          accel="tcg", memory=256, cpus=2, forwards=[(5555, 6379), (8022, 22)],
                          console=Path("/run/console.log"), qemu="/usr/bin/qemu-system-x86_64")
    assert argv[:10] == ["/usr/bin/qemu-system-x86_64", "-accel", "tcg", "-nographic",
                         "-no-reboot", "-m", "256", "-smp", "2", "-kernel"]
    assert _pairs(argv, "-kernel") == ["/k/vmlinuz"] and _pairs(argv, "-initrd") == ["/k/initrd.img"]
    assert _pairs(argv, "-append") == ["console=ttyS0 quiet"]
    assert _pairs(argv, "-netdev") == [
        "user,id=n0,hostfwd=tcp:127.0.0.1:5555-:6379,hostfwd=tcp:127.0.0.1:8022-:22"]
    assert _pairs(argv, "-device") == ["virtio-net-pci,netdev=n0"]
    assert _pairs(argv, "-serial") == ["file:/run/console.log"] and _pairs(argv, "-monitor") == ["none"]
    assert "-machine" not in argv and "-cpu" not in argv


def test_iso_and_disk_argv():
    bios = qemu.qemu_argv(qemu.iso_boot(Path("/x/a.iso")), accel="kvm")
    assert _pairs(bios, "-cdrom") == ["/x/a.iso"] and _pairs(bios, "-boot") == ["d"]
    assert _pairs(bios, "-cpu") == ["host"]
    # interactive: the console on stdio, with Ctrl-C stopping QEMU rather than reaching the guest
    assert _pairs(bios, "-serial") == ["chardev:con0"]
    assert _pairs(bios, "-chardev") == ["stdio,id=con0,signal=on"]
    disk = qemu.qemu_argv(qemu.disk_boot(Path("/x/a,b.qcow2")), accel="tcg")
    assert _pairs(disk, "-drive") == ["file=/x/a,,b.qcow2,format=qcow2,if=virtio,snapshot=on"]
    raw = qemu.qemu_argv(qemu.disk_boot(Path("/x/a-bios.img")), accel="tcg")
    assert _pairs(raw, "-drive") == ["file=/x/a-bios.img,format=raw,if=virtio,snapshot=on"]


def test_efi_argv_uses_ovmf_and_the_private_vars():
    try:
        code, _ = qemu.ovmf_firmware()
    except QemuError as e:
        require(False, str(e))
    argv = qemu.qemu_argv(qemu.iso_boot(Path("/x/a-efi.iso"), efi=True), accel="tcg",
                          efi_vars=Path("/run/OVMF_VARS.fd"))
    assert _pairs(argv, "-machine") == ["q35"] and "-boot" not in argv
    assert _pairs(argv, "-drive") == [f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                                      "if=pflash,format=raw,unit=1,file=/run/OVMF_VARS.fd"]
    with pytest.raises(QemuError, match="needs efi_vars"):
        qemu.qemu_argv(qemu.disk_boot(Path("/x/a-efi.img"), efi=True), accel="tcg")
    with pytest.raises(QemuError, match="tcg or kvm, not 'hvf'"):
        qemu.qemu_argv(qemu.iso_boot(Path("/x/a.iso")), accel="hvf")


def test_arm64_argv_picks_the_virt_machine_and_its_firmware():
    argv = qemu.qemu_argv(qemu.kernel_boot(Path("/k/vmlinuz"), Path("/k/initrd.img"),
                                           "console=ttyAMA0", arch="arm64"), accel="tcg")
    assert argv[0] == "qemu-system-aarch64"
    assert _pairs(argv, "-machine") == ["virt"] and _pairs(argv, "-cpu") == ["cortex-a57"]
    assert _pairs(argv, "-append") == ["console=ttyAMA0"]
    assert _pairs(argv, "-device") == ["virtio-net-pci,netdev=n0"]
    try:
        code, _ = qemu.ovmf_firmware("arm64")
    except QemuError as e:
        require(False, str(e))
    efi = qemu.qemu_argv(qemu.disk_boot(Path("/x/a.img"), efi=True, arch="arm64"), accel="tcg",
                         efi_vars=Path("/run/VARS.fd"))
    assert _pairs(efi, "-machine") == ["virt"] and "AAVMF" in str(code)
    assert _pairs(efi, "-drive")[0] == f"if=pflash,format=raw,unit=0,readonly=on,file={code}"
    with pytest.raises(QemuError, match="boots amd64 and arm64 guests, not 'riscv64'"):
        qemu.qemu_argv(qemu.kernel_boot(Path("/k"), None, "", arch="riscv64"), accel="tcg")


def test_a_foreign_guest_is_emulated(tmp_path, monkeypatch):
    monkeypatch.delenv(qemu.ACCEL_ENV, raising=False)
    boot = qemu.kernel_boot(Path("/k"), None, "", arch="arm64" if platform.machine() == "x86_64"
                            else "amd64")
    assert qemu.VM(boot, tmp_path).accel == "tcg"
    with pytest.raises(QemuError, match="KVM runs only guests of this machine's architecture"):
        qemu.VM(boot, tmp_path, accel="kvm")


# ---- the accelerator -----------------------------------------------------------------------

def test_accel_override(monkeypatch):
    monkeypatch.setenv(qemu.ACCEL_ENV, "kvm")
    assert qemu.choose_accel() == "kvm"
    assert qemu.choose_accel("tcg") == "tcg"  # the parameter beats the variable
    monkeypatch.setenv(qemu.ACCEL_ENV, "TCG")
    assert qemu.choose_accel() == "tcg"
    monkeypatch.setenv(qemu.ACCEL_ENV, "whpx")
    with pytest.raises(QemuError, match=r"unknown QEMU accelerator 'whpx' \(from "
                       r"\$FORGE_QEMU_ACCEL\): use tcg, kvm or auto"):
        qemu.choose_accel()


@pytest.mark.real
def test_kvm_probe_is_memoised(tmp_path):
    require(shutil.which(qemu.QEMU) is not None, "qemu-system-x86_64 missing (qemu-system-x86)")
    memo = tmp_path / "accel.json"
    if not (os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)):
        assert qemu.kvm_works(memo=memo) is False and not memo.exists()
        return
    t = time.monotonic()
    first = qemu.kvm_works(memo=memo)
    assert time.monotonic() - t < 10  # a hanging KVM is given 3 s, never more
    [(key, value)] = json.loads(memo.read_text()).items()
    assert key.startswith(platform.release() + " | QEMU emulator version") and value is first
    # The answer comes from the memo from now on: flip it and see it returned.
    memo.write_text(json.dumps({key: not first}))
    assert qemu.kvm_works(memo=memo) is (not first)
    print(f"KVM usable here: {first}")


# ---- probes against real local servers ----------------------------------------------------

class Server:
    """A TCP server on 127.0.0.1 that, like a guest still booting behind QEMU's user
    networking, first closes connections without a word and resets some, then answers."""

    def __init__(self, reply: bytes, bad: int = 4, speaks_first: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.reply, self.bad, self.seen, self.received = reply, bad, 0, b""
        self.speaks_first = speaks_first
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.seen += 1
                if self.seen <= self.bad:
                    if self.seen % 2:  # a reset (RST instead of FIN)
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    continue
                conn.settimeout(2)
                try:
                    if not self.speaks_first:
                        self.received = conn.recv(1024)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_redis_ping_waits_through_resets_and_empty_replies():
    srv = Server(b"+PONG\r\n", bad=4)
    try:
        t = time.monotonic()
        assert wait_for(redis_ping("127.0.0.1", srv.port), 10)
        assert srv.received == b"*1\r\n$4\r\nPING\r\n" and srv.seen == 5
        assert 4 * 0.25 <= time.monotonic() - t < 5  # polled every 0.25 s
    finally:
        srv.close()


def test_tcp_expect_with_a_regex():
    srv = Server(b"SSH-2.0-OpenSSH_9.2\r\n", bad=1, speaks_first=True)
    try:
        m = wait_for(tcp_expect(srv.port, b"", re.compile(rb"SSH-2\.0-(\S+)")), 10)
        assert m.group(1) == b"OpenSSH_9.2"
    finally:
        srv.close()


def test_timeout_carries_the_console_tail(tmp_path):
    srv = Server(b"-ERR not ready\r\n", bad=0)
    console = tmp_path / "console.log"
    console.write_bytes(b"".join(b"\x1b[2Jline %d\r\n" % i for i in range(1, 61)))
    try:
        t = time.monotonic()
        with pytest.raises(BootTimeout) as e:
            wait_for(redis_ping("127.0.0.1", srv.port), 1.5, console=console)
        assert 1.5 <= time.monotonic() - t < 4
    finally:
        srv.close()
    msg = str(e.value)
    assert msg.startswith(f"no redis PING on 127.0.0.1:{srv.port} after 1.5 s\n"
                          "last console lines:\n  line 21\n")
    assert msg.endswith("  line 60") and "line 20\n" not in msg and "\x1b" not in msg
    assert e.value.console_tail.splitlines() == [f"line {i}" for i in range(21, 61)]
    assert srv.seen >= 4


def test_a_process_that_ends_early_is_reported(tmp_path):
    console = tmp_path / "console.log"
    console.write_text("Kernel panic - not syncing: no init found\n")
    port = qemu.free_port()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    t = time.monotonic()
    with pytest.raises(VMExited) as e:
        wait_for(redis_ping("127.0.0.1", port), 60, console=console, proc=proc,
                      qemu_output=lambda: "qemu-system-x86_64: something broke")
    assert time.monotonic() - t < 10 and e.value.returncode == 7
    assert str(e.value).splitlines() == [
        f"QEMU exited with status 7 before redis PING on 127.0.0.1:{port} answered",
        "QEMU said:", "  qemu-system-x86_64: something broke",
        "last console lines:", "  Kernel panic - not syncing: no init found"]


def test_free_port_is_bindable():
    port = qemu.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# ---- real boots ------------------------------------------------------------------------------

def _need_qemu() -> None:
    require(shutil.which(qemu.QEMU) is not None, "qemu-system-x86_64 missing (qemu-system-x86)")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.real
def test_kernel_initrd_boot_reaches_the_marker(cloud_kernel, boot_initrd, tmp_path):  # noqa: F811
    _need_qemu()
    t = time.monotonic()
    with qemu.VM(qemu.kernel_boot(cloud_kernel.vmlinuz, boot_initrd, CMDLINE), tmp_path,
                 accel="tcg", forwards={6379: 0}) as vm:
        m = vm.wait(console_regex(f"^{MARKER}$"), timeout=120)
        assert m.group(0) == MARKER
        pid = vm.pid
        assert vm.host_port(6379) > 0
    print(f"kernel+initrd boot: {time.monotonic() - t:.1f} s to {MARKER}")
    assert _gone(pid)
    # The init powers off: waiting for something else reports the exit and the console.
    with qemu.VM(qemu.kernel_boot(cloud_kernel.vmlinuz, boot_initrd, CMDLINE), tmp_path / "2",
                 accel="tcg") as vm:
        with pytest.raises(VMExited) as e:
            vm.wait(console_regex("^never printed$"), timeout=120)
    assert e.value.returncode == 0 and MARKER in e.value.console_tail.splitlines()
    assert "Power down" in e.value.console_tail


@pytest.mark.real
def test_a_running_vm_is_killed_on_ctrl_c(cloud_kernel, tmp_path):  # noqa: F811
    _need_qemu()
    initrd = busybox_initrd(tmp_path / "sleepy.img", "#!/bin/busybox sh\necho STILL-UP\n"
                            "exec /bin/busybox sleep 1000\n")
    with pytest.raises(KeyboardInterrupt):
        with qemu.VM(qemu.kernel_boot(cloud_kernel.vmlinuz, initrd, CMDLINE), tmp_path / "run",
                     accel="tcg") as vm:
            vm.wait(console_regex("^STILL-UP$"), timeout=120)
            pid = vm.pid
            assert vm.proc.poll() is None and os.getpgid(pid) == pid  # its own group
            raise KeyboardInterrupt
    assert _gone(pid) and vm.proc.returncode is not None


def test_secure_boot_argv_uses_the_secboot_firmware_with_smm(tmp_path):
    from forge.formats.vm import secureboot
    try:
        code = secureboot.secure_firmware()
    except QemuError as e:
        require(False, str(e))
    boot = secureboot.enforcing(qemu.disk_boot(Path("d.img"), efi=True), tmp_path / "v.fd")
    argv = qemu.qemu_argv(boot, accel="tcg", efi_vars=tmp_path / "copy.fd")
    assert argv[argv.index("-machine") + 1] == "q35,smm=on" and argv.count("-machine") == 1
    assert "driver=cfi.pflash01,property=secure,value=on" in argv
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={code}" in argv
    with pytest.raises(QemuError, match="needs a UEFI boot"):
        secureboot.enforcing(qemu.disk_boot(Path("d.img")), tmp_path / "v.fd")


def test_enrolled_vars_refuses_what_is_not_a_certificate(tmp_path):
    from forge.formats.vm import secureboot
    (tmp_path / "x.crt").write_text("not a certificate")
    with pytest.raises(QemuError, match="is not a PEM certificate"):
        secureboot.enrolled_vars(tmp_path / "x.crt", tmp_path / "v.fd")
    with pytest.raises(QemuError, match="No such file"):
        secureboot.enrolled_vars(tmp_path / "missing.crt", tmp_path / "v.fd")
