"""Launching QEMU virtual machines and waiting for them to answer.

A `Boot` says what to boot (a kernel with its initrd, an ISO, a raw or qcow2 disk, by BIOS
or UEFI); `qemu_argv` turns it into a command line; `VM` runs that command in its own
process group and always kills it on leaving its `with` block; `wait_for` polls a probe
(`redis_ping`, `tcp_expect`, `console_regex`) every 0.25 s until it answers, the deadline
passes (BootTimeout) or QEMU exits (VMExited); both errors carry the console's last lines.

Disks are attached with `snapshot=on`: the guest's writes go to a temporary overlay, so an
image in a cache is never modified. UEFI boots get a private copy of OVMF's variable store,
since the firmware writes its boot entries into it.

The accelerator is "tcg", "kvm" or "auto" (the default, overridden by $FORGE_QEMU_ACCEL);
see `choose_accel` for how "auto" decides.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from forge.formats.vm.errors import QemuError
from forge.formats.vm.probe import TAIL_LINES, Probe, console_tail, wait_for

__all__ = ["ACCEL_ENV", "MACHINES", "Boot", "Machine", "VM", "machine_for", "qemu_binary", "choose_accel", "disk_boot", "free_port", "iso_boot",
           "kernel_boot", "kvm_works", "ovmf_firmware", "qemu_argv"]

ACCEL_ENV = "FORGE_QEMU_ACCEL"
QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class Machine:
    """How QEMU emulates one guest architecture (Debian's name for it)."""
    binary: str
    package: str              # the Debian package that has `binary`
    machine: str | None       # -M, None: QEMU's default (pc); UEFI boots use q35
    tcg_cpu: str | None       # -cpu under TCG, None: QEMU's default
    efi: tuple                # (code, variables template) pairs, most specific first
    efi_package: str


# Under TCG an arm64 guest gets a Cortex-A57: `-cpu max` also emulates pointer
# authentication, which makes every function call of an arm64 kernel much slower.
MACHINES = {
    "amd64": Machine(QEMU, "qemu-system-x86", None, None, (), "ovmf"),
    "arm64": Machine("qemu-system-aarch64", "qemu-system-arm", "virt", "cortex-a57",
                     (("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd"),),
                     "qemu-efi-aarch64"),
}


def machine_for(arch: str) -> Machine:
    try:
        return MACHINES[arch]
    except KeyError:
        raise QemuError(f"forge boots amd64 and arm64 guests, not {arch!r}") from None
# (code, variables template) pairs, most specific first: Debian's 4M build, Debian's 2M
# build, Fedora's edk2 package.
OVMF = [("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
        ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
        ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd")]


# ---- what to boot, and the command line -----------------------------------------------------

@dataclass(frozen=True)
class Boot:
    kind: str                 # "kernel" | "iso" | "disk"
    efi: bool = False         # UEFI (OVMF on q35) instead of SeaBIOS
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    image: Path | None = None  # the ISO or the disk
    image_format: str = "raw"  # of a disk, QEMU's name: "raw" | "qcow2" | "vpc" (VHD) | "vmdk"
    drive: Path | None = None  # a kernel boot's root image: a read-only virtio disk
    arch: str = "amd64"        # the guest's architecture (Debian's name)
    # Secure Boot enforcing: OVMF's secboot build, with this variable store (keys enrolled,
    # see forge.formats.vm.secureboot) as the VM's starting copy.
    secure_vars: Path | None = None


def kernel_boot(kernel: Path, initrd: Path | None, cmdline: str, *,
                drive: Path | None = None, arch: str = "amd64") -> Boot:
    return Boot("kernel", kernel=Path(kernel), initrd=Path(initrd) if initrd else None,
                cmdline=cmdline, drive=Path(drive) if drive else None, arch=arch)


def iso_boot(iso: Path, *, efi: bool = False, arch: str = "amd64") -> Boot:
    return Boot("iso", efi=efi, image=Path(iso), arch=arch)


_SUFFIX_FORMAT = {".qcow2": "qcow2", ".vhd": "vpc", ".vmdk": "vmdk"}


def disk_boot(image: Path, *, efi: bool = False, image_format: str | None = None,
              arch: str = "amd64") -> Boot:
    """A disk on virtio; `image_format` defaults from the file's suffix (else raw). An ISO
    may boot this way too: a hybrid ISO is also a disk."""
    image = Path(image)
    return Boot("disk", efi=efi, image=image, arch=arch,
                image_format=image_format or _SUFFIX_FORMAT.get(image.suffix, "raw"))


def ovmf_firmware(arch: str = "amd64") -> tuple[Path, Path]:
    """The UEFI firmware's code and variable-store template: OVMF, or AAVMF for arm64."""
    m = machine_for(arch)
    for code, var in (OVMF if arch == "amd64" else m.efi):
        if os.path.isfile(code) and os.path.isfile(var):
            return Path(code), Path(var)
    raise QemuError(f"no UEFI firmware for {arch} boots: install the Debian package {m.efi_package}")


def qemu_binary(arch: str = "amd64") -> str:
    m = machine_for(arch)
    found = shutil.which(m.binary)
    if found is None:
        raise QemuError(f"{m.binary} is not installed: install the Debian package {m.package}")
    return found


def _opt(path: Path) -> str:
    return str(path).replace(",", ",,")  # a comma inside an option value is doubled


def qemu_argv(boot: Boot, *, accel: str, memory: int = 256, cpus: int = 1,
              forwards: Iterable[tuple[int, int]] = (), console: Path | None = None,
              efi_vars: Path | None = None, qemu: str | None = None,
              extra: Iterable[str] = ()) -> list[str]:
    """The QEMU command line. `forwards` are (host port, guest port) pairs, on 127.0.0.1;
    `console` None puts the serial console on stdio (Ctrl-C stops QEMU), a path writes it
    there; `efi_vars` is the VM's own copy of the OVMF variable store."""
    if accel not in ("tcg", "kvm"):
        raise QemuError(f"accelerator must be tcg or kvm, not {accel!r}")
    m = machine_for(boot.arch)
    argv = [qemu or m.binary, "-accel", accel, "-nographic", "-no-reboot", "-m", str(memory),
            "-smp", str(cpus)]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    elif m.tcg_cpu:
        argv += ["-cpu", m.tcg_cpu]
    if m.machine:
        argv += ["-machine", m.machine]
    if boot.efi:
        if efi_vars is None:
            raise QemuError("a UEFI boot needs efi_vars: a private copy of OVMF's variables")
        code, _ = ovmf_firmware(boot.arch)
        if boot.secure_vars is not None:
            from forge.formats.vm.secureboot import secure_firmware
            code = secure_firmware(boot.arch)
            # SMM keeps the variable store out of the guest's reach, which the secboot
            # build requires; without it OVMF stops before it starts anything.
            argv += ["-machine", "q35,smm=on", "-global",
                     "driver=cfi.pflash01,property=secure,value=on"]
        argv += ([] if m.machine or boot.secure_vars else ["-machine", "q35"]) + [
                 "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(code)}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={_opt(efi_vars)}"]
    if boot.kind == "kernel":
        argv += ["-kernel", str(boot.kernel), "-append", boot.cmdline]
        if boot.initrd is not None:
            argv += ["-initrd", str(boot.initrd)]
        if boot.drive is not None:
            argv += ["-drive", f"file={_opt(boot.drive)},format=raw,if=virtio,readonly=on"]
    elif boot.kind == "iso":
        argv += ["-cdrom", str(boot.image)] + ([] if boot.efi else ["-boot", "d"])
    elif boot.kind == "disk":
        argv += ["-drive", f"file={_opt(boot.image)},"
                 f"format={boot.image_format},if=virtio,snapshot=on"]
    else:
        raise QemuError(f"unknown boot kind {boot.kind!r}")
    fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in forwards)
    argv += ["-netdev", f"user,id=n0{fwd}", "-device", "virtio-net-pci,netdev=n0"]
    if console is not None:
        argv += ["-serial", f"file:{console}", "-monitor", "none"]
    else:
        # The terminal stays cooked for signals: Ctrl-C stops QEMU (and forge) instead of
        # reaching the guest, as -nographic's default mon:stdio would have it.
        argv += ["-chardev", "stdio,id=con0,signal=on", "-serial", "chardev:con0", "-monitor", "none"]
    return argv + list(extra)


# ---- the accelerator ----------------------------------------------------------------------

# A boot sector that writes 1 to QEMU's isa-debug-exit port (0xf4): QEMU exits with status
# (1 << 1) | 1 = 3. Code: mov al,1; out 0xf4,al; hlt; jmp $.
_PROBE_SECTOR = bytes([0xB0, 0x01, 0xE6, 0xF4, 0xF4, 0xEB, 0xFE]).ljust(510, b"\0") + b"\x55\xaa"
_PROBE_SECONDS = 3.0


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "forge"


def kvm_works(qemu: str | None = None, *, memo: Path | None = None) -> bool:
    """Whether KVM runs guests here at a useful speed.

    /dev/kvm being there and openable is not enough: on some machines (nested or emulated
    hosts) KVM accepts a VM and then crawls or hangs; on this project's build machine the
    probe below takes 6 s of system time under KVM, and a Linux kernel never reaches its
    init. So the probe runs SeaBIOS up to a one-instruction boot sector that exits through
    isa-debug-exit: it takes about 0.1 s under a healthy KVM (and under TCG). KVM is used
    only if the probe exits with the expected status within 3 s. The answer is kept in
    ~/.cache/forge/qemu-accel.json keyed by kernel release and QEMU version, since those
    are what change it.
    """
    if not (os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)):
        return False
    qemu = qemu or qemu_binary()
    try:
        version = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return False
    key = f"{platform.release()} | {version}"
    memo = memo or _cache_dir() / "qemu-accel.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), bool):
        return known[key]
    with tempfile.TemporaryDirectory(prefix="forge-kvm-probe-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(_PROBE_SECTOR)
        argv = [qemu, "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none",
                "-machine", "pc", "-m", "16", "-no-reboot",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-drive", f"file={disk},format=raw,if=ide,snapshot=on"]
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            ok = p.wait(_PROBE_SECONDS) == 3
        except subprocess.TimeoutExpired:
            ok = False
        finally:
            _kill_group(p)
    known[key] = ok
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmpf = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmpf.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(tmpf, memo)
    except OSError:
        pass  # no cache: probe again next time
    return ok


def choose_accel(requested: str | None = None, *, qemu: str | None = None) -> str:
    """"tcg" or "kvm": `requested`, else $FORGE_QEMU_ACCEL, else "auto" (kvm where
    `kvm_works`, tcg otherwise)."""
    want = (requested or os.environ.get(ACCEL_ENV) or "auto").strip().lower()
    if want in ("tcg", "kvm"):
        return want
    if want != "auto":
        raise QemuError(f"unknown QEMU accelerator {want!r} (from "
                        f"{'the request' if requested else '$' + ACCEL_ENV}): "
                        "use tcg, kvm or auto")
    return "kvm" if kvm_works(qemu) else "tcg"


def _host_arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _foreign_accel(requested: str | None, arch: str) -> str:
    """Another architecture than the host's is only emulated (TCG)."""
    want = (requested or os.environ.get(ACCEL_ENV) or "auto").strip().lower()
    if want == "kvm":
        raise QemuError(f"KVM runs only guests of this machine's architecture, not {arch}: "
                        "use --accel tcg (or auto)")
    return "tcg"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- running a VM -------------------------------------------------------------------------

def _kill_group(p: subprocess.Popen, grace: float = 0.0) -> None:
    """End `p`'s process group: SIGTERM and up to `grace` seconds, then SIGKILL; the
    SIGKILL also happens when the wait is interrupted (Ctrl-C). The group is signalled only
    while its leader is unreaped, so its id cannot have been reused."""
    try:
        if grace and p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
    finally:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()


class VM:
    """A QEMU process for a `with` block: started on entry, killed (its whole process
    group) on exit, also on errors and Ctrl-C. Headless, the serial console goes to
    `rundir/console.log` and QEMU's own output to `rundir/qemu.log`; interactive, both use
    the terminal and QEMU stays in the terminal's process group (a background group would
    be stopped by SIGTTIN when it reads the keyboard)."""

    def __init__(self, boot: Boot, rundir: Path, *, accel: str | None = None,
                 memory: int = 256, cpus: int = 1, forwards: Mapping[int, int] | None = None,
                 interactive: bool = False, extra: Iterable[str] = ()):
        """`forwards` maps guest ports to host ports (0: a free one, see `host_port`)."""
        self.boot, self.rundir, self.interactive = boot, Path(rundir), interactive
        self.accel = choose_accel(accel) if boot.arch == _host_arch() else _foreign_accel(accel, boot.arch)
        self.ports = {g: (h or free_port()) for g, h in (forwards or {}).items()}
        self.console = None if interactive else self.rundir / "console.log"
        self.proc: subprocess.Popen | None = None
        self._opts = dict(memory=memory, cpus=cpus, extra=tuple(extra))

    def host_port(self, guest_port: int) -> int:
        return self.ports[guest_port]

    def argv(self) -> list[str]:
        efi_vars = self.rundir / "OVMF_VARS.fd" if self.boot.efi else None
        return qemu_argv(self.boot, accel=self.accel, console=self.console, efi_vars=efi_vars,
                         forwards=sorted((h, g) for g, h in self.ports.items()),
                         qemu=qemu_binary(self.boot.arch), **self._opts)

    def start(self) -> VM:
        self.rundir.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        if self.boot.efi:
            shutil.copyfile(self.boot.secure_vars or ovmf_firmware(self.boot.arch)[1],
                            self.rundir / "OVMF_VARS.fd")
        if self.interactive:
            self.proc = subprocess.Popen(argv)
        else:
            self.console.write_bytes(b"")
            with open(self.rundir / "qemu.log", "wb") as log:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.interactive:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
        else:
            _kill_group(self.proc, grace=2.0)

    def __enter__(self) -> VM:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def console_tail(self, lines: int = TAIL_LINES) -> str:
        return console_tail(self.console, lines)

    def qemu_output(self) -> str:
        try:
            return (self.rundir / "qemu.log").read_text(errors="replace").strip()
        except OSError:
            return ""

    def wait(self, probe: Probe, timeout: float = 120) -> object:
        """`wait_for(probe)` with this VM's console and process."""
        return wait_for(probe, timeout, console=self.console, proc=self.proc,
                        qemu_output=self.qemu_output)

    def wait_exit(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

