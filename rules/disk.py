"""The output formats of `linuxkit_image`: one action each, all without root, loop devices
or a Docker engine, all byte-reproducible. The disk formats are built by
forge.formats.disk.images from the kernel, the initrd and the command line; the host tools
each one runs are part of its key, so upgrading xorriso or grub rebuilds the image.

aws, gcp, vhd, dynamic-vhd and vmdk are conversions of the BIOS raw disk
(forge.formats.disk.convert): each is an LkConvert action whose input is the output of the
raw-bios LkDisk action, planned once per target whether or not raw-bios is asked for, so
adding one of them to a target runs that conversion (and the raw disk, the first time)
only. Two formats that would write the same file (vhd and dynamic-vhd: N.vhd) are an
error in one target."""

from __future__ import annotations

import tarfile

from forge.api import ActionFailed, ExecContext, action_function
from forge.formats.disk.errors import DiskImageError
from forge.formats.disk import convert as diskconvert
from forge.formats.disk import images as diskimage
from forge.formats.disk import kernel_tar
from forge.formats.linux.fragments import FragmentWriter
from rules import compressors

# format -> output file names, templates of the target's name; the disk formats' names
# are those the library writes.
FORMATS = {
    "kernel+initrd": ("{name}-kernel", "{name}-initrd.img", "{name}-cmdline"),
    "tar": ("{name}.tar",),
    "tar-kernel-initrd": ("{name}-initrd.tar",),
    **diskimage.FORMATS,
    **diskconvert.FORMATS,
}
_BOOT_FILES = FORMATS["kernel+initrd"]  # shared by the formats that write them, not a clash


def plan_format(ctx, fmt: str, name: str, boot: dict, kernel_dir, fragments: list) -> list:
    """Plan the action for `fmt`; its output artifacts."""
    if fmt == "kernel+initrd":
        return [boot["kernel"], boot["initrd"], boot["cmdline"]]
    _check_clash(ctx, fmt, name)
    outs = [ctx.declare(n.format(name=name)) for n in FORMATS[fmt]]
    if fmt == "tar":
        ctx.call("LkTar", {}, inputs=[boot["kernel"], boot["cmdline"], kernel_dir, *fragments],
                 outputs=outs, mnemonic="LkTar")
        return outs
    if fmt == "tar-kernel-initrd":
        ctx.call("LkKernelTar", {}, inputs=[boot["kernel"], boot["initrd"], boot["cmdline"],
                                            kernel_dir], outputs=outs, mnemonic="LkKernelTar")
        return outs
    if fmt in diskconvert.FORMATS:
        raw = _disk(ctx, diskconvert.SOURCE, name, boot, wanted=fmt)[0]
        params = {"format": fmt, "name": name}
        if fmt == "gcp":
            params["compressor"] = compressors.param("gzip")
        ctx.call("LkConvert", params, inputs=[raw], outputs=outs, mnemonic="LkConvert",
                 tools=_tools(ctx, fmt, diskconvert.tools),
                 description=f"LkConvert {ctx.label} [{fmt}]")
        return outs
    return _disk(ctx, fmt, name, boot)


def _tools(ctx, fmt: str, find, wanted: str | None = None) -> list[str]:
    try:
        return find(fmt)
    except DiskImageError as e:
        what = f"{wanted} (a conversion of the {fmt} disk)" if wanted and wanted != fmt else fmt
        raise ctx.fail(f"format {what} cannot be built here: {e}", attr="formats",
                       hint="install the package (dev/setup.sh lists them all), or drop the format") from None


def _disk(ctx, fmt: str, name: str, boot: dict, wanted: str | None = None) -> list:
    """The LkDisk action of `fmt`, planned once: a conversion (`wanted`) may ask for it."""
    outs = [ctx.declare(n) for n in diskimage.output_names(fmt, name)]
    if any(outs[0] in a.outputs for a in ctx.actions):
        return outs
    ctx.call("LkDisk", {"format": fmt, "name": name},
             inputs=[boot["kernel"], boot["initrd"], boot["cmdline"]], outputs=outs,
             mnemonic="LkDisk", tools=_tools(ctx, fmt, diskimage.tools, wanted),
             description=f"LkDisk {ctx.label} [{fmt}]")
    return outs


def _check_clash(ctx, fmt: str, name: str) -> None:
    mine = {n.format(name=name) for n in FORMATS[fmt] if n not in _BOOT_FILES}
    for other in ctx.attr.formats:
        same = mine & {n.format(name=name) for n in FORMATS.get(other, ())} if other != fmt else set()
        if same:
            raise ctx.fail(f"formats {fmt} and {other} both write {', '.join(sorted(same))}",
                           attr="formats", hint="keep one of them here, and build the other "
                           "in a second linuxkit_image (its name names the files)")


@action_function("LkDisk", version=2)  # 2: iso-efi is a hybrid (GPT, appended ESP)
def disk_step(ctx: ExecContext) -> None:
    p = ctx.params
    kernel, initrd, cmdline = (ctx.path(i) for i in ctx.inputs[:3])
    outdir = ctx.path(ctx.outputs[0]).parent
    work = ctx.path(".work")
    work.mkdir()
    try:
        made = diskimage.build(p["format"], kernel=kernel, initrd=initrd,
                               cmdline=cmdline.read_text(), name=p["name"], outdir=outdir,
                               workdir=work, epoch=ctx.source_date_epoch)
    except DiskImageError as e:
        raise ActionFailed(str(e)) from None
    missing = {str(ctx.path(o)) for o in ctx.outputs} - {str(m) for m in made}
    if missing:
        raise ActionFailed(f"{p['format']} did not write {', '.join(sorted(missing))}")


@action_function("LkConvert", version=1)
def convert_step(ctx: ExecContext) -> None:
    p = ctx.params
    if "compressor" in p:
        compressors.check(ctx, "gzip")
    outdir = ctx.path(ctx.outputs[0]).parent
    work = ctx.path(".work")
    work.mkdir()
    try:
        diskconvert.build(p["format"], raw=ctx.path(ctx.inputs[0]), name=p["name"],
                          outdir=outdir, workdir=work, epoch=ctx.source_date_epoch)
    except DiskImageError as e:
        raise ActionFailed(str(e)) from None


@action_function("LkKernelTar", version=1)
def kernel_tar_step(ctx: ExecContext) -> None:
    """LinuxKit's tar-kernel-initrd: kernel, initrd.img, cmdline[, ucode.cpio]."""
    kernel, initrd, cmdline, kdir = (ctx.path(i) for i in ctx.inputs[:4])
    ucode = kdir / "ucode.cpio"
    try:
        kernel_tar.write(ctx.path(ctx.outputs[0]), kernel=kernel, initrd=initrd, cmdline=cmdline,
                         ucode=ucode if ucode.is_file() else None, epoch=ctx.source_date_epoch)
    except DiskImageError as e:
        raise ActionFailed(str(e)) from None


@action_function("LkTar", version=1)
def tar_step(ctx: ExecContext) -> None:
    """The root filesystem as one tar, as LinuxKit's `tar` format: boot/kernel,
    boot/cmdline, boot/ucode.cpio, then every fragment in initrd order."""
    kernel, cmdline, kdir = (ctx.path(i) for i in ctx.inputs[:3])
    with open(ctx.path(ctx.outputs[0]), "wb") as f, FragmentWriter(f, mtime=ctx.source_date_epoch) as w:
        w.file("boot/kernel", kernel.read_bytes())
        w.file("boot/cmdline", cmdline.read_bytes())
        if (kdir / "ucode.cpio").is_file():
            w.file("boot/ucode.cpio", (kdir / "ucode.cpio").read_bytes())
        for rel in ctx.inputs[3:]:
            p = ctx.path(rel)
            with tarfile.open(p / "rootfs.tar" if p.is_dir() else p) as tf:
                w.copy_tree(tf)


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(disk_step, convert_step, kernel_tar_step, tar_step)
