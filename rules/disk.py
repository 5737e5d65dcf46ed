"""The output formats of `linuxkit_image`: one action each, all without root, loop devices
or a Docker engine, all byte-reproducible. The disk formats are built by
forge.formats.disk.images from the kernel, the initrd and the command line; the host tools
each one runs are part of its key, so upgrading xorriso or grub rebuilds the image."""

from __future__ import annotations

import tarfile

from forge.api import ActionFailed, ExecContext, action_function
from forge.formats.disk.errors import DiskImageError
from forge.formats.disk import images as diskimage
from forge.formats.linux.fragments import FragmentWriter

# format -> output file names, templates of the target's name; the disk formats' names
# are those the library writes.
FORMATS = {
    "kernel+initrd": ("{name}-kernel", "{name}-initrd.img", "{name}-cmdline"),
    "tar": ("{name}.tar",),
    **diskimage.FORMATS,
}


def plan_format(ctx, fmt: str, name: str, boot: dict, kernel_dir, fragments: list) -> list:
    """Plan the action for `fmt`; its output artifacts."""
    if fmt == "kernel+initrd":
        return [boot["kernel"], boot["initrd"], boot["cmdline"]]
    outs = [ctx.declare(n.format(name=name)) for n in FORMATS[fmt]]
    if fmt == "tar":
        if boot is None:  # no kernel: the root filesystem alone, as `linuxkit build` makes it
            ctx.call("LkTar", {"boot": False}, inputs=fragments, outputs=outs, mnemonic="LkTar")
            return outs
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
    boot = ctx.params.get("boot", True)
    with open(ctx.path(ctx.outputs[0]), "wb") as f, FragmentWriter(f, mtime=ctx.source_date_epoch) as w:
        if boot:
            kernel, cmdline, kdir = (ctx.path(i) for i in ctx.inputs[:3])
            w.file("boot/kernel", kernel.read_bytes())
            w.file("boot/cmdline", cmdline.read_bytes())
            if (kdir / "ucode.cpio").is_file():
                w.file("boot/ucode.cpio", (kdir / "ucode.cpio").read_bytes())
        for rel in ctx.inputs[3 if boot else 0:]:
            p = ctx.path(rel)
            with tarfile.open(p / "rootfs.tar" if p.is_dir() else p) as tf:
                w.copy_tree(tf)


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(disk_step, tar_step)
