"""The output formats of `linuxkit_image`: one action each, all without root, loop devices
or a Docker engine, all byte-reproducible. The disk formats are built by
forge.formats.disk.images from the kernel, the initrd and the command line; the host tools
each one runs are part of its key, so upgrading xorriso or grub rebuilds the image."""

from __future__ import annotations

import tarfile

from forge.api import ActionFailed, ExecContext, action_function
from forge.formats.disk.errors import DiskImageError
from forge.formats.disk import images as diskimage
from forge.formats.disk import rootfs
from forge.formats.linux import bootinitrd
from forge.formats.linux.errors import BootInitrdError
from forge.formats.linux.fragments import FragmentWriter

# format -> output file names, templates of the target's name; the disk formats' names
# are those the library writes.
FORMATS = {
    "kernel+initrd": ("{name}-kernel", "{name}-initrd.img", "{name}-cmdline"),
    "tar": ("{name}.tar",),
    **diskimage.FORMATS,
    **rootfs.FORMATS,
}


def plan_format(ctx, fmt: str, name: str, boot: dict, kernel_dir, fragments: list) -> list:
    """Plan the action for `fmt`; its output artifacts."""
    if fmt == "kernel+initrd":
        return [boot["kernel"], boot["initrd"], boot["cmdline"]]
    if fmt in rootfs.FORMATS:
        return _plan_root_image(ctx, fmt, name, boot, kernel_dir, fragments)
    outs = [ctx.declare(n.format(name=name)) for n in FORMATS[fmt]]
    if fmt == "tar":
        ctx.call("LkTar", {}, inputs=[boot["kernel"], boot["cmdline"], kernel_dir, *fragments],
                 outputs=outs, mnemonic="LkTar")
        return outs
    try:
        tools = diskimage.tools(fmt)
    except DiskImageError as e:
        raise ctx.fail(f"format {fmt} cannot be built here: {e}", attr="formats",
                       hint="install the package (dev/setup.sh lists them all), or drop the format") from None
    ctx.call("LkDisk", {"format": fmt, "name": name},
             inputs=[boot["kernel"], boot["initrd"], boot["cmdline"]], outputs=outs,
             mnemonic="LkDisk", tools=tools, description=f"LkDisk {ctx.label} [{fmt}]")
    return outs


def _plan_root_image(ctx, fmt: str, name: str, boot: dict, kernel_dir, fragments: list) -> list:
    """The image of the whole root tree, on the shared fragments; and, once per target,
    the boot initrd that mounts it (forge.formats.linux.bootinitrd says why)."""
    if fmt == "kernel+iso" and "iso-bios" in ctx.attr.formats:
        raise ctx.fail(f"kernel+iso and iso-bios both write {name}.iso (as in LinuxKit)",
                       attr="formats", hint="build them in two linuxkit_image targets")
    try:
        tools = rootfs.tools(fmt)
    except DiskImageError as e:
        raise ctx.fail(f"format {fmt} cannot be built here: {e}", attr="formats",
                       hint="install the package (dev/setup.sh lists them all), or drop the format") from None
    image = ctx.declare(rootfs.FORMATS[fmt][1].format(name=name))
    ctx.call("LkRootImage", {"format": fmt, "name": name}, inputs=fragments, outputs=[image],
             mnemonic="LkRootImage", tools=tools, description=f"LkRootImage {ctx.label} [{fmt}]")
    if "boot-initrd" not in boot:
        boot["boot-initrd"] = ctx.declare(rootfs.BOOT_INITRD.format(name=name))
        ctx.call("LkBootInitrd", {}, inputs=[kernel_dir, *fragments],
                 outputs=[boot["boot-initrd"]], mnemonic="LkBootInitrd")
    return [boot["kernel"], image, boot["cmdline"], boot["boot-initrd"]]


@action_function("LkRootImage", version=1)
def root_image_step(ctx: ExecContext) -> None:
    work = ctx.path(".work")
    work.mkdir()
    try:
        rootfs.build(ctx.params["format"], fragments=[ctx.path(i) for i in ctx.inputs],
                     name=ctx.params["name"], out=ctx.path(ctx.outputs[0]), workdir=work,
                     epoch=ctx.source_date_epoch)
    except DiskImageError as e:
        raise ActionFailed(str(e)) from None


@action_function("LkBootInitrd", version=1)
def boot_initrd_step(ctx: ExecContext) -> None:
    kernel_tar = ctx.path(ctx.inputs[0]) / "kernel.tar"
    try:
        busybox = bootinitrd.find_busybox([ctx.path(i) for i in ctx.inputs[1:]])
        bootinitrd.build(ctx.path(ctx.outputs[0]), kernel_tar=kernel_tar, busybox=busybox,
                         epoch=ctx.source_date_epoch)
    except BootInitrdError as e:
        raise ActionFailed(str(e)) from None


@action_function("LkDisk", version=1)
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
    rule_set.add(disk_step, tar_step, root_image_step, boot_initrd_step)
