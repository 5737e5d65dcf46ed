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

from forge.api import ActionFailed, ExecContext, action_function, attr, rule
from forge.formats.disk.errors import DiskImageError
from forge.formats.disk import convert as diskconvert
from forge.formats.disk import images as diskimage
from forge.formats.disk.tools import tool_env
from forge.formats.disk import rootfs
from forge.formats.linux import bootinitrd
from forge.formats.linux.errors import BootInitrdError
from forge.formats.disk import rpi3
from forge.formats.disk import kernel_tar
from forge.formats.disk import sbsign
from forge.formats.disk import uki
from forge.formats.linux.fragments import FragmentWriter
from rules import compressors, verity

from .kernel import DOC_KEYRING, fetch_action, pinned_deb

# format -> output file names, templates of the target's name; the disk formats' names
# are those the library writes.
FORMATS = {
    "kernel+initrd": ("{name}-kernel", "{name}-initrd.img", "{name}-cmdline"),
    "tar": ("{name}.tar",),
    "tar-kernel-initrd": ("{name}-initrd.tar",),
    **diskimage.FORMATS,
    **rootfs.FORMATS,
    **diskconvert.FORMATS,
    "rpi3": (rpi3.OUTPUT,),  # LinuxKit's name, the same as tar's: one of them per target
    "uki": (uki.OUTPUT,),
}


# The formats an image of another architecture than amd64 may build: those that need no
# boot loader, and rpi3's U-Boot.
ANY_ARCH = ("kernel+initrd", "tar", "tar-kernel-initrd", "rpi3")

# Files several formats write on purpose: the boot files are the same artifacts for all.
_SHARED = {*FORMATS["kernel+initrd"], rootfs.BOOT_INITRD}


def check_file_names(ctx, formats: list, name: str) -> None:
    """LinuxKit gives some formats the same file name (kernel+iso and iso-bios: N.iso; tar
    and rpi3: N.tar; vhd and dynamic-vhd: N.vhd), where one output would silently replace
    the other: one target builds only one of them."""
    writer = {}
    for fmt in formats:
        for template in set(FORMATS[fmt]) - _SHARED:
            other = writer.setdefault(template, fmt)
            if other != fmt:
                raise ctx.fail(f"formats {other} and {fmt} both write {template.format(name=name)}",
                               attr="formats", hint="keep one of them here, and build the other "
                               "in a second linuxkit_image (its name names the files)")


def plan_format(ctx, fmt: str, name: str, boot: dict, kernel_dir, fragments: list,
                arch: str = "", dm_debs: list | None = None) -> list:
    """Plan the action for `fmt`; its output artifacts. `arch`: the image's architecture
    (Debian's or OCI's name, "" if unknown). `dm_debs`: the image has a verified root
    (rules/verity.py): the debs of dmsetup for its boot initrd."""
    if fmt == "kernel+initrd":
        return [boot["kernel"], boot["initrd"], boot["cmdline"]]
    if fmt in rootfs.FORMATS:
        return _plan_root_image(ctx, fmt, name, boot, kernel_dir, fragments, dm_debs)
    if fmt == "rpi3":
        return _plan_rpi3(ctx, name, boot, kernel_dir, arch)
    if fmt == "uki":
        return [_uki(ctx, name, boot)]
    outs = [ctx.declare(n.format(name=name)) for n in FORMATS[fmt]]
    if fmt == "tar":
        if boot is None:  # no kernel: the root filesystem alone, as `linuxkit build` makes it
            ctx.call("LkTar", {"boot": False}, inputs=fragments, outputs=outs, mnemonic="LkTar")
            return outs
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
    params = {"format": fmt, "name": name}
    inputs = [boot["kernel"], boot["initrd"], boot["cmdline"]]
    tools = _tools(ctx, fmt, diskimage.tools, wanted)
    if fmt in diskimage.EFI_FORMATS:
        if _efi_boot(ctx) == "uki":  # the UKI is the ESP's loader, signed with it if a key is given
            params["efi_boot"] = "uki"
            inputs.append(_uki(ctx, name, boot))
        elif _secure_boot_key(ctx):  # GRUB, signed
            params["sign"] = True
            inputs += _secure_boot_key(ctx)
            tools = sorted(tools + _sign_tools(ctx, fmt))
    ctx.call("LkDisk", params, inputs=inputs, outputs=outs, mnemonic="LkDisk", tools=tools,
             description=f"LkDisk {ctx.label} [{fmt}]")
    return outs


# --- uki: a unified kernel image, signed for Secure Boot with secure_boot_key -------------

EFI_BOOTS = ("grub", "uki")
UKI_STUB_HINT = ('add `uki_stub(name = "uki_stub")` to the BUILD file and '
                 '`uki_stub = ":uki_stub"` to this target')


def _efi_boot(ctx) -> str:
    return getattr(ctx.attr, "efi_boot", None) or "grub"


def _secure_boot_key(ctx) -> list:
    """The (key, certificate) artifacts of `secure_boot_key`, in the order given; [] if unset."""
    if not getattr(ctx.attr, "secure_boot_key", None):
        return []
    files = ctx.files("secure_boot_key")
    if len(files) != 2:
        raise ctx.fail(f"secure_boot_key must name two files, a PEM private key and its PEM "
                       f"certificate; it names {len(files)}", attr="secure_boot_key",
                       hint='secure_boot_key = ["db.key", "db.crt"]')
    return files


def _sign_tools(ctx, fmt: str) -> list[str]:
    try:
        return sbsign.tools()
    except DiskImageError as e:
        raise ctx.fail(f"format {fmt} with secure_boot_key cannot be signed here: {e}",
                       attr="secure_boot_key",
                       hint="install the package (dev/setup.sh lists them all), or drop the key") from None


def _uki(ctx, name: str, boot: dict):
    """The LkUki action, planned once: the uki format and EFI disks booting it share it."""
    out = ctx.declare(uki.OUTPUT.format(name=name))
    if any(out in a.outputs for a in ctx.actions):
        return out
    stub = ctx.deps("uki_stub") if getattr(ctx.attr, "uki_stub", None) else []
    if not stub or stub[0].extra.get("uki_stub") is None:
        raise ctx.fail("a unified kernel image needs systemd's EFI stub"
                       + (f"; {ctx.attr.uki_stub} is not a uki_stub target" if stub else ""),
                       attr="uki_stub" if stub else "formats", hint=UKI_STUB_HINT)
    stub_file = next(a for a in stub[0].files if a.path == stub[0].extra["uki_stub"])
    key = _secure_boot_key(ctx)
    ctx.call("LkUki", {"name": name, "signed": bool(key)},
             inputs=[boot["kernel"], boot["initrd"], boot["cmdline"], stub_file, *key],
             outputs=[out], mnemonic="LkUki", tools=_sign_tools(ctx, "uki") if key else [],
             description=f"LkUki {ctx.label}" + (" [signed]" if key else ""))
    return out


def _key_and_cert(ctx: ExecContext, paths: list):
    """secure_boot_key's two files as (key, certificate), told apart by their PEM headers."""
    a, b = paths
    first = a.read_bytes()
    return (a, b) if b"PRIVATE KEY-----" in first else (b, a)


@action_function("LkUki", version=1)
def uki_step(ctx: ExecContext) -> None:
    kernel, initrd, cmdline, stub = (ctx.path(i) for i in ctx.inputs[:4])
    out = ctx.path(ctx.outputs[0])
    try:
        out.write_bytes(uki.build(stub.read_bytes(), kernel=kernel.read_bytes(),
                                  initrd=initrd.read_bytes(),
                                  cmdline=cmdline.read_text().strip("\n"),
                                  osrel=uki.os_release(ctx.params["name"])))
        if ctx.params["signed"]:
            key, cert = _key_and_cert(ctx, [ctx.path(i) for i in ctx.inputs[4:6]])
            work = ctx.path(".work")
            work.mkdir()
            sbsign.sign(out, out, key=key, cert=cert, epoch=ctx.source_date_epoch,
                        env=tool_env(work, ctx.source_date_epoch))
    except DiskImageError as e:
        out.unlink(missing_ok=True)
        raise ActionFailed(str(e)) from None


@rule("uki_stub", version=1, doc="""systemd's EFI stub (linuxx64.efi.stub) from Debian's
systemd-boot-efi package, pinned in forge.lock: the executable a `uki` (unified kernel
image) of linuxkit_image is built on. `deb` takes another .deb.""", attrs={
    "suite": attr.string(default="bookworm", doc="Debian suite of systemd-boot-efi."),
    "deb": attr.label(doc="A deb_package (or .deb) of systemd-boot-efi; default: fetched "
                      "from `suite`."),
    "keyring": attr.string(default="", doc=DOC_KEYRING),
})
def uki_stub(ctx):
    if ctx.attr.deb:
        files = ctx.files("deb")
        if len(files) != 1:
            raise ctx.fail(f"deb must name one .deb file; it names {len(files)}", attr="deb")
        deb = files[0]
    else:
        pin = pinned_deb(ctx, "deb", "systemd-boot-efi", arch="amd64")
        deb = fetch_action(ctx, pin, f"{ctx.label.name}.debs/systemd-boot-efi.deb")
    out = ctx.declare(f"{ctx.label.name}/linuxx64.efi.stub")
    ctx.call("UkiStub", {"path": uki.STUB_PATH}, inputs=[deb], outputs=[out], mnemonic="UkiStub")
    return ctx.info(files=[out], uki_stub=out.path)


@action_function("UkiStub", version=1)
def uki_stub_step(ctx: ExecContext) -> None:
    from forge.formats.debian.errors import DebError
    from forge.formats.debian.package import open_data_tar
    deb, want = ctx.inputs[0], ctx.params["path"]
    try:
        with open_data_tar(ctx.path(deb)) as tf:
            for m in tf:
                if m.isfile() and m.name.lstrip("./") == want:
                    ctx.path(ctx.outputs[0]).write_bytes(tf.extractfile(m).read())
                    return
    except (DebError, OSError) as e:
        raise ActionFailed(f"{deb}: {e}") from None
    raise ActionFailed(f"{deb} has no {want}: not systemd-boot-efi for amd64")


def _plan_root_image(ctx, fmt: str, name: str, boot: dict, kernel_dir, fragments: list,
                     dm_debs: list | None = None) -> list:
    """The image of the whole root tree, on the shared fragments; and, once per target,
    the boot initrd that mounts it (forge.formats.linux.bootinitrd says why). With
    `dm_debs`, the image gets its hash tree and N-cmdline its root hash (rules/verity.py)."""
    try:
        tools = rootfs.tools(fmt)
    except DiskImageError as e:
        raise ctx.fail(f"format {fmt} cannot be built here: {e}", attr="formats",
                       hint="install the package (dev/setup.sh lists them all), or drop the format") from None
    final = rootfs.FORMATS[fmt][1].format(name=name)
    image = ctx.declare(f"{name}.verity/{final}" if dm_debs else final)
    ctx.call("LkRootImage", {"format": fmt, "name": name}, inputs=fragments, outputs=[image],
             mnemonic="LkRootImage", tools=tools, description=f"LkRootImage {ctx.label} [{fmt}]")
    if dm_debs:
        image = verity.plan(ctx, fmt, name, image, boot, final)
    if "boot-initrd" not in boot:
        boot["boot-initrd"] = ctx.declare(rootfs.BOOT_INITRD.format(name=name))
        extra = {"dm_debs": len(dm_debs)} if dm_debs else {}  # without: the key stays as it was
        ctx.call("LkBootInitrd", extra, inputs=[kernel_dir, *(dm_debs or []), *fragments],
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
    n = ctx.params.get("dm_debs", 0)
    dmsetup, find = verity.dm_tools([ctx.path(i) for i in ctx.inputs[1:1 + n]]) if n else (None, None)
    try:
        busybox = bootinitrd.find_busybox([ctx.path(i) for i in ctx.inputs[1 + n:]])
        bootinitrd.build(ctx.path(ctx.outputs[0]), kernel_tar=kernel_tar, busybox=busybox,
                         epoch=ctx.source_date_epoch, dmsetup=dmsetup, find_library=find)
    except BootInitrdError as e:
        raise ActionFailed(str(e)) from None


@action_function("LkDisk", version=2)  # 2: iso-efi is a hybrid (GPT, appended ESP)
def disk_step(ctx: ExecContext) -> None:
    p = ctx.params
    kernel, initrd, cmdline = (ctx.path(i) for i in ctx.inputs[:3])
    outdir = ctx.path(ctx.outputs[0]).parent
    work = ctx.path(".work")
    work.mkdir()
    loader = ctx.path(ctx.inputs[3]) if p.get("efi_boot") == "uki" else None
    try:
        key = (_key_and_cert(ctx, [ctx.path(i) for i in ctx.inputs[3:5]])
               if p.get("sign") else None)
        made = diskimage.build(p["format"], kernel=kernel, initrd=initrd,
                               cmdline=cmdline.read_text(), name=p["name"], outdir=outdir,
                               workdir=work, epoch=ctx.source_date_epoch, efi_loader=loader,
                               sign_key=key)
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


# --- rpi3: LinuxKit's Raspberry Pi 3 tar (forge.formats.disk.rpi3) -----------------------

RPI_FIRMWARE_HINT = ('add `rpi_firmware(name = "rpi3_firmware")` to the BUILD file and '
                     '`firmware = ":rpi3_firmware"` to this target')


def _plan_rpi3(ctx, name: str, boot: dict, kernel_dir, arch: str) -> list:
    if arch != "arm64":
        raise ctx.fail(f"format rpi3 boots arm64 images only; this image is for {arch}",
                       attr="formats", hint='give the image arch = "arm64" and a kernel(package = '
                       '"linux-image-arm64", arch = "arm64", dtbs = ["broadcom"]), or drop rpi3')
    fw = ctx.deps("firmware")
    if not fw or fw[0].extra.get("rpi_firmware") is None:
        raise ctx.fail("format rpi3 needs the Raspberry Pi firmware and U-Boot"
                       + (f"; {ctx.attr.firmware} is not an rpi_firmware target" if fw else ""),
                       attr="firmware" if fw else "formats", hint=RPI_FIRMWARE_HINT)
    fwdir = next(a for a in fw[0].files if a.path == fw[0].extra["rpi_firmware"])
    try:
        tools = rpi3.tools()
    except DiskImageError as e:
        raise ctx.fail(f"format rpi3 cannot be built here: {e}", attr="formats",
                       hint="install u-boot-tools (dev/setup.sh lists every package), "
                       "or drop the format") from None
    out = ctx.declare(rpi3.output_name(name))
    ctx.call("LkRpi3", {"name": name},
             inputs=[boot["kernel"], boot["initrd"], boot["cmdline"], kernel_dir, fwdir],
             outputs=[out], mnemonic="LkRpi3", tools=tools, description=f"LkRpi3 {ctx.label}")
    return [out]


@action_function("LkRpi3", version=1)
def rpi3_step(ctx: ExecContext) -> None:
    kernel, initrd, cmdline, kdir, fw = (ctx.path(i) for i in ctx.inputs[:5])
    try:
        rpi3.build(kernel=kernel, initrd=initrd, cmdline=cmdline.read_text().strip("\n"),
                   firmware=fw, uboot=fw / rpi3.UBOOT, dtbs=kdir / rpi3.DTB_DIR,
                   name=ctx.params["name"], outdir=ctx.path(ctx.outputs[0]).parent,
                   workdir=ctx.path(".work"), epoch=ctx.source_date_epoch)
    except DiskImageError as e:
        raise ActionFailed(str(e)) from None


@rule("rpi_firmware", version=1, doc="""The Raspberry Pi boot files the `rpi3` format of
linuxkit_image needs, from Debian's arm64 packages: the GPU firmware (raspi-firmware, in
the non-free-firmware component) and U-Boot (u-boot-rpi, /usr/lib/u-boot/<board>/u-boot.bin).
Both are pinned in forge.lock; `firmware_deb` / `uboot_deb` take other .debs.""", attrs={
    "board": attr.string(default="rpi_3", values=("rpi_3", "rpi_arm64"),
                         doc="U-Boot's target in u-boot-rpi (rpi_arm64 also boots a Pi 4)."),
    "suite": attr.string(default="bookworm", doc="Debian suite of both packages."),
    "firmware_deb": attr.label(doc="A deb_package (or .deb) of raspi-firmware; default: "
                               "fetched from `suite`."),
    "uboot_deb": attr.label(doc="A deb_package (or .deb) of u-boot-rpi; default: fetched "
                            "from `suite`."),
    "keyring": attr.string(default="", doc=DOC_KEYRING),
})
def rpi_firmware(ctx):
    debs = []
    for attr_name, package, component in (("firmware_deb", "raspi-firmware", "non-free-firmware"),
                                          ("uboot_deb", "u-boot-rpi", "main")):
        if getattr(ctx.attr, attr_name):
            files = ctx.files(attr_name)
            if len(files) != 1:
                raise ctx.fail(f"{attr_name} must name one .deb file; it names {len(files)}",
                               attr=attr_name)
            debs.append(files[0])
        else:
            pin = pinned_deb(ctx, "deb", package, component, arch="arm64")
            debs.append(fetch_action(ctx, pin, f"{ctx.label.name}.debs/{package}.deb"))
    out = ctx.declare_dir(ctx.label.name)
    ctx.call("RpiFirmware", {"board": ctx.attr.board}, inputs=debs, outputs=[out],
             mnemonic="RpiFirmware")
    return ctx.info(files=[out], rpi_firmware=out.path)


# Debian's paths of what the rpi3 tar holds; the licence is the package's copyright file,
# which carries the Broadcom licence of the firmware.
_FW_DIR = "usr/lib/raspi-firmware/"
_FW_LICENCE = "usr/share/doc/raspi-firmware/copyright"


@action_function("RpiFirmware", version=1)
def rpi_firmware_step(ctx: ExecContext) -> None:
    from forge.formats.debian.errors import DebError
    from forge.formats.debian.package import open_data_tar
    out = ctx.path(ctx.outputs[0])
    want = {_FW_DIR + n: n for n in rpi3.FIRMWARE if n != "LICENCE.broadcom"}
    want[_FW_LICENCE] = "LICENCE.broadcom"
    uboot = {f"usr/lib/u-boot/{ctx.params['board']}/u-boot.bin": rpi3.UBOOT}
    for deb, names in zip(ctx.inputs, (want, uboot)):
        try:
            with open_data_tar(ctx.path(deb)) as tf:
                for m in tf:
                    name = m.name.lstrip("./")
                    if m.isfile() and name in names:
                        (out / names[name]).write_bytes(tf.extractfile(m).read())
        except (DebError, OSError) as e:
            raise ActionFailed(f"{deb}: {e}") from None
        missing = sorted(p for p, n in names.items() if not (out / n).is_file())
        if missing:
            raise ActionFailed(f"{deb} has no {', '.join(missing)}: not "
                               f"{'raspi-firmware' if names is want else 'u-boot-rpi'} for arm64")


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(disk_step, convert_step, kernel_tar_step, tar_step, root_image_step,
                 boot_initrd_step, rpi3_step, rpi_firmware, rpi_firmware_step, uki_step,
                 uki_stub, uki_stub_step)
