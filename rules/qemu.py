"""Booting OS images under QEMU: the runner behind `forge run` for `linuxkit_image`
targets, and `qemu_test`, which boots an image headless and probes it.

The accelerator is chosen by forge.formats.vm.machine (KVM where it works, else TCG; override
with `--accel` or FORGE_QEMU_ACCEL). Images in the cache are never written: disks boot
with `snapshot=on`.

An ISO boots as a CD; `drive = "disk"` (`forge run --drive disk`) attaches it as a virtio
disk instead, as a USB stick it was written to would be: the ISOs are hybrids. gcp's
archive is unpacked (sparse) into the VM's run directory and its disk.raw booted.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from forge.api import ActionFailed, RunContext, attr, build_helper, pool, rule, runner

QEMU_POOL = pool("qemu", 2)

# format -> how it boots (see forge.formats.qemu.boot_spec)
BOOTABLE = ("kernel+initrd", "iso-bios", "iso-efi", "raw-bios", "raw-efi", "qcow2-bios", "qcow2-efi",
            "kernel+squashfs", "kernel+erofs", "kernel+iso",
            "iso-efi-initrd", "aws", "gcp", "vhd", "dynamic-vhd", "vmdk")
# How a disk format is attached (QEMU's format= names); every one not EFI here boots by BIOS,
# as LinuxKit's images for aws, gcp, vhd and vmdk do (MBR and SYSLINUX).
_DISK_FORMAT = {"qcow2-bios": "qcow2", "qcow2-efi": "qcow2", "vhd": "vpc", "dynamic-vhd": "vpc",
                "vmdk": "vmdk"}
DRIVES = ("default", "disk")

REDIS_PING = build_helper("redis_ping", '''def redis_ping(port = 6379):
    """A qemu_test probe: Redis answers PING with PONG on guest port `port`."""
    return {"kind": "redis_ping", "port": port}
''')
TCP_EXPECT = build_helper("tcp_expect", '''def tcp_expect(port, send = "", expect = ""):
    """A qemu_test probe: after sending `send` to guest port `port`, the reply matches the
    regular expression `expect`."""
    return {"kind": "tcp_expect", "port": port, "send": send, "expect": expect}
''')
CONSOLE_REGEX = build_helper("console_regex", '''def console_regex(pattern):
    """A qemu_test probe: a line of the serial console matches `pattern`."""
    return {"kind": "console_regex", "pattern": pattern}
''')

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m)?$")


def _seconds(text: str) -> float | None:
    m = _DURATION.match(text.strip())
    if not m:
        return None
    return float(m.group(1)) * (60 if m.group(2) == "m" else 1)


def _image_formats(ctx, attr_name: str) -> dict:
    info = ctx.deps(attr_name)[0]
    formats = info.extra.get("formats")
    if formats is None:
        raise ctx.fail(f"{getattr(ctx.attr, attr_name)} is not an OS image (linuxkit_image) target",
                       attr=attr_name)
    return formats


@rule("qemu_test", version=1, test=True, doc="""Boots an OS image under QEMU with no display
and passes when its probe succeeds before the timeout; on failure it reports the tail of
the serial console. The VM is always killed. Host ports are picked free at each run, so
boot tests run side by side.""", attrs={
    "image": attr.label(mandatory=True, doc="A linuxkit_image target."),
    "format": attr.string(default="kernel+initrd", values=BOOTABLE,
                          doc="Which of the image's formats to boot (the image must build it)."),
    "forward": attr.int_dict(doc="Ports to forward, {HOST: GUEST} as `-p HOST:GUEST`; in a test "
                             "the host side is always a free port."),
    "probe": attr.dict(doc="redis_ping(port), tcp_expect(port, send, expect) or "
                       "console_regex(pattern); default: the console shows the init's "
                       "'forge-init: services started'."),
    "timeout": attr.string(default="120s", doc="How long the probe may take, e.g. 90s or 3m."),
    "memory": attr.int(default=512, doc="Guest memory in MiB."),
    "cpus": attr.int(default=1, doc="Guest CPUs."),
    "drive": attr.string(default="default", values=DRIVES,
                         doc="How the image is attached: default (an ISO as a CD, a disk image "
                         "as a virtio disk) or disk (an ISO as a virtio disk, as a USB stick "
                         "holding it would be)."),
    "secure_boot_vars": attr.label(doc="A PEM certificate: boot with Secure Boot enforcing "
                                   "(OVMF's secboot build), this certificate enrolled as PK, "
                                   "KEK and db and no Microsoft keys. EFI formats only."),
})
def qemu_test(ctx):
    formats = _image_formats(ctx, "image")
    fmt = ctx.attr.format
    if fmt not in formats:
        raise ctx.fail(f"{ctx.attr.image} does not build the format '{fmt}'", attr="format",
                       hint=f"add \"{fmt}\" to its formats, or test one of: {', '.join(formats)}")
    timeout = _seconds(ctx.attr.timeout)
    if timeout is None:
        raise ctx.fail(f"timeout '{ctx.attr.timeout}' is not a duration", attr="timeout",
                       hint='write seconds or minutes: "120s", "3m"')
    forward = ctx.attr.forward or {}  # unset attributes are None
    probe = dict(ctx.attr.probe or {}) or {"kind": "console_regex", "pattern": "forge-init: services started"}
    if probe.get("kind") not in ("redis_ping", "tcp_expect", "console_regex"):
        raise ctx.fail("probe must be redis_ping(), tcp_expect(...) or console_regex(...)", attr="probe")
    if probe["kind"] != "console_regex" and probe["port"] not in forward.values():
        raise ctx.fail(f"the probe reaches guest port {probe['port']}, which forward does not "
                       "forward", attr="probe",
                       hint=f"add forward = {{{probe['port']}: {probe['port']}}}")
    if ctx.attr.drive == "disk" and not fmt.startswith("iso-"):
        raise ctx.fail(f"drive = \"disk\" boots an ISO as a disk; {fmt} is not an ISO",
                       attr="drive", hint="drop drive, or boot one of the iso-* formats")
    info = ctx.deps("image")[0]
    files = [a for a in info.files if a.path in formats[fmt]]
    params = {
        "format": fmt, "arch": info.extra.get("arch", "amd64"), "files": formats[fmt],
        "forward": {str(g): g for g in forward.values()},
        "probe": probe, "timeout": timeout, "memory": ctx.attr.memory, "cpus": ctx.attr.cpus,
        "drive": ctx.attr.drive}
    if ctx.attr.secure_boot_vars:
        if not _efi(fmt):
            raise ctx.fail(f"Secure Boot needs a UEFI boot; {fmt} boots by "
                           f"{'-kernel' if fmt.startswith('kernel+') else 'BIOS'}",
                           attr="secure_boot_vars",
                           hint="boot one of the EFI formats: " + ", ".join(
                               f for f in BOOTABLE if _efi(f)))
        certs = ctx.files("secure_boot_vars")
        if len(certs) != 1:
            raise ctx.fail(f"secure_boot_vars must name one PEM certificate; it names "
                           f"{len(certs)} files", attr="secure_boot_vars")
        files.append(certs[0])
        params["secure_boot_cert"] = certs[0].path
    return ctx.info(files=files, test={"runner": "QemuTest", "params": params})


def _efi(fmt: str) -> bool:
    return fmt.endswith("-efi") or fmt.startswith("iso-efi")


def boot_spec(fmt: str, paths: list, rundir=None, drive: str = "default", arch: str = "amd64"):
    """How QEMU boots the files of format `fmt` (see disk.FORMATS for their order) on a
    machine of `arch`; `rundir` is the VM's own directory (gcp's disk is unpacked there);
    `drive` "disk" attaches an ISO as a disk."""
    from forge.formats.vm import machine as qemu
    efi = _efi(fmt)
    if fmt == "kernel+initrd":
        kernel, initrd, cmdline = paths
        return qemu.kernel_boot(kernel, initrd, cmdline.read_text(), arch=arch)
    if fmt.startswith("kernel+"):  # the root image as the first virtio disk, /dev/vda
        kernel, image, cmdline, boot_initrd = paths
        return qemu.kernel_boot(kernel, boot_initrd, cmdline.read_text(), drive=image, arch=arch)
    if fmt.startswith("iso-"):
        if drive == "disk":
            return qemu.disk_boot(paths[0], efi=efi, image_format="raw", arch=arch)
        return qemu.iso_boot(paths[0], efi=efi, arch=arch)
    if fmt == "gcp":
        from forge.formats.disk.gcp import unpack
        return qemu.disk_boot(unpack(paths[0], rundir), image_format="raw", arch=arch)
    return qemu.disk_boot(paths[0], efi=efi, image_format=_DISK_FORMAT.get(fmt, "raw"), arch=arch)


class _Cancelled(Exception):
    pass


def _probe(p: dict, vm, cancel):
    """The test's probe, also watching for Ctrl-C (which kills the VM at once)."""
    from forge.formats.vm.probe import Probe, console_regex, redis_ping, tcp_expect
    kind = p["kind"]
    if kind == "redis_ping":
        probe = redis_ping("127.0.0.1", vm.host_port(p["port"]))
    elif kind == "tcp_expect":
        probe = tcp_expect(vm.host_port(p["port"]), p.get("send", "").encode(), p.get("expect", ""))
    else:
        probe = console_regex(p["pattern"])

    def check(console):
        if cancel is not None and cancel.is_set():
            raise _Cancelled()
        return probe.check(console)
    return Probe(probe.what, check)


@runner("QemuTest")
def qemu_test_runner(ctx: RunContext) -> int:
    import tempfile
    import time
    from forge.formats.vm import machine as qemu
    from forge.formats.vm.errors import QemuError
    from forge.formats.disk.errors import DiskImageError
    p = ctx.params
    out = ctx.out or sys.stdout
    accel = ctx.config.get("qemu", {}).get("accel")
    with tempfile.TemporaryDirectory(prefix="forge-qemu-") as rundir:
        try:
            spec = boot_spec(p["format"], [ctx.root / f for f in p["files"]], rundir,
                             p.get("drive", "default"), p.get("arch", "amd64"))
            if p.get("secure_boot_cert"):
                from forge.formats.vm import secureboot
                store = secureboot.enrolled_vars(ctx.root / p["secure_boot_cert"],
                                                 Path(rundir) / "secure-boot-vars.fd", spec.arch)
                spec = secureboot.enforcing(spec, store)
        except (DiskImageError, QemuError) as e:
            raise ActionFailed(str(e)) from None
        vm = qemu.VM(spec, rundir, accel=accel, memory=p["memory"], cpus=p["cpus"],
                     forwards={int(g): 0 for g in p["forward"].values()})
        t0 = time.monotonic()
        try:
            with vm:
                vm.wait(_probe(p["probe"], vm, ctx.cancel), timeout=p["timeout"])
        except _Cancelled:
            raise ActionFailed("interrupted") from None
        except QemuError as e:
            raise ActionFailed(str(e)) from None
    out.write(f"{p['probe']['kind']} answered {time.monotonic() - t0:.1f} s after QEMU started "
              f"({p['format']}, {p.get('arch', 'amd64')}, {vm.accel})\n")
    return 0


@runner("QemuRun")
def qemu_run(ctx: RunContext) -> int:
    """`forge run //images:x [--format F] [-p HOST:GUEST]... [--accel kvm|tcg] [-m MiB]
    [--cpus N] [--drive disk]`: the serial console on this terminal; Ctrl-C (or powering
    off) stops it."""
    import tempfile
    from forge.api import UsageError
    from forge.formats.disk.errors import DiskImageError
    from forge.formats.vm import machine as qemu
    from forge.formats.vm.errors import QemuError
    formats = ctx.params["formats"]
    ap = argparse.ArgumentParser(prog="forge run IMAGE", add_help=False)
    ap.add_argument("--format", default=next((f for f in BOOTABLE if f in formats), None))
    ap.add_argument("-p", "--publish", action="append", default=[])
    ap.add_argument("--accel")
    ap.add_argument("-m", "--memory", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--drive", choices=DRIVES, default="default")
    try:
        args = ap.parse_args(ctx.args)
    except SystemExit:
        raise UsageError(f"cannot read the run options {' '.join(ctx.args)}",
                         hint="forge run IMAGE [--format F] [-p HOST:GUEST]... [--accel kvm|tcg] "
                         "[-m MiB] [--cpus N] [--drive disk]") from None
    if args.format is None:  # e.g. only rpi3, or an assembly without a kernel: only tar
        raise UsageError(f"the image builds no format forge run can boot (it builds: "
                         f"{', '.join(formats)})",
                         hint=f"give the assembly a kernel and add one of {', '.join(BOOTABLE)} "
                         "to its formats")
    if args.format not in formats or args.format not in BOOTABLE:
        raise UsageError(f"the image has no bootable format '{args.format}'",
                         hint=f"it builds: {', '.join(f for f in formats if f in BOOTABLE)}")
    forwards = {}
    for text in args.publish:
        host, _, guest = text.partition(":")
        if not (host.isdigit() and (guest or host).isdigit()):
            raise UsageError(f"-p {text}: expected PORT or HOST:GUEST")
        forwards[int(guest or host)] = int(host)
    if args.drive == "disk" and not args.format.startswith("iso-"):
        raise UsageError(f"--drive disk boots an ISO as a disk; {args.format} is not an ISO")
    with tempfile.TemporaryDirectory(prefix="forge-qemu-") as rundir:
        try:
            spec = boot_spec(args.format, [ctx.root / f for f in formats[args.format]], rundir,
                             args.drive, ctx.params.get("arch", "amd64"))
            vm = qemu.VM(spec, rundir, accel=args.accel or ctx.config.get("qemu", {}).get("accel"),
                         memory=args.memory, cpus=args.cpus, forwards=forwards, interactive=True)
            vm.argv()  # a missing QEMU or firmware is said now, not as a crash
        except (QemuError, DiskImageError) as e:
            raise ActionFailed(str(e)) from None
        print(f"forge: booting {ctx.params['name']} ({args.format}, {vm.accel}); Ctrl-C stops the VM"
              + "".join(f"; 127.0.0.1:{h} -> guest {g}" for g, h in vm.ports.items()), file=sys.stderr)
        try:
            with vm:
                return vm.wait_exit()
        except KeyboardInterrupt:
            print("\nforge: VM stopped", file=sys.stderr)
            return 0


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(QEMU_POOL, REDIS_PING, TCP_EXPECT, CONSOLE_REGEX, qemu_test, qemu_test_runner,
                 qemu_run)
