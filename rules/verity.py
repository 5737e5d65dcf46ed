"""`verity = True` on linuxkit_image: a root image (kernel+squashfs or kernel+erofs) that
the kernel reads only through dm-verity (docs/supply-chain.md, "Verified root").

The plan, for an image named N:

    LkRootImage   -> N.verity/<image>: the root image as without verity
    LkVerity      -> N-squashfs.img / N-erofs.img: that image with its hash tree appended
                     (forge.formats.disk.verity), and N-cmdline: the assembly's command
                     line with `dm-mod.create="vroot,,,ro,<table>" root=/dev/dm-0`
    DebFetch x 6  -> dmsetup and the packages of the libraries it loads, pinned by sha256
                     in forge.lock, from the suite's verified index
    LkBootInitrd  -> N-boot-initrd.img, which also holds dmsetup and its libraries

The root hash is in N-cmdline, so whatever boots or signs that command line (a UKI)
vouches for every block of the root.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tarfile

from forge.api import ActionFailed, ExecContext, action_function
from forge.formats.disk import verity as dmverity
from forge.formats.disk.errors import DiskImageError

from . import debtrust
from .kernel import fetch_action

FORMATS = ("kernel+squashfs", "kernel+erofs")
SUITE = "bookworm"
# dmsetup and the packages of every library it loads (libdevmapper needs libselinux and
# libudev, libselinux libpcre2); which of their files go in the initrd is found from the
# ELF headers (forge.formats.linux.elf), so a library moved between packages is an error
# that names it, not a broken boot.
DEBS = ("dmsetup", "libdevmapper1.02.1", "libc6", "libselinux1", "libudev1", "libpcre2-8-0")
# Formats that may come with the root image: they take boot["initrd"] and boot["cmdline"],
# which after it are the boot initrd and the verity command line.
COMPANIONS = ("uki",)
HINT = ("build the other formats in a second linuxkit_image of the same assembly (the "
        "fragments are shared)")


def check(ctx, formats: list, arch: str, known: tuple = ()) -> None:
    """`verity` makes N-cmdline the verity one: one root image per target, and beside it
    only a format that boots that image's kernel, boot initrd and command line (a UKI,
    where `known` has it)."""
    if arch != "amd64":
        raise ctx.fail(f"verity is built for amd64 images; this one is for {arch}",
                       attr="verity", hint="drop verity, or build for amd64")
    companions = [f for f in COMPANIONS if f in known]
    roots = [f for f in formats if f in FORMATS]
    if len(roots) != 1 or any(f not in FORMATS and f not in companions for f in formats):
        also = f" (and {' or '.join(companions)})" if companions else ""
        raise ctx.fail(f"verity = True needs exactly one format, kernel+squashfs or kernel+erofs"
                       f"{also}; formats are {', '.join(formats) or 'empty'}", attr="formats",
                       hint=HINT)


def order(formats: list) -> list:
    """The root image first: what comes after it boots its boot initrd and N-cmdline."""
    return sorted(formats, key=lambda f: f not in FORMATS)


def fetch_debs(ctx, name: str) -> list:
    trust = debtrust.trust_for(ctx, SUITE)
    out = []
    for package in DEBS:
        pin = dict(json.loads(debtrust.pin(ctx, "deb", f"{SUITE}/amd64/{package}", trust)),
                   _trust=trust)
        out.append(fetch_action(ctx, pin, f"{name}.verity/{package}.deb"))
    return out


def plan(ctx, fmt: str, name: str, unverified, boot: dict, final_name: str):
    """The LkVerity action: the image with its tree, and N-cmdline; boot["cmdline"] becomes
    the verity one (the assembly's stays in N.verity/cmdline). The caller then makes
    boot["initrd"] the boot initrd."""
    image, cmdline = ctx.declare(final_name), ctx.declare(f"{name}-cmdline")
    ctx.call("LkVerity", {}, inputs=[unverified, boot["cmdline"]], outputs=[image, cmdline],
             mnemonic="LkVerity", tools=_tools(ctx), description=f"LkVerity {ctx.label} [{fmt}]")
    boot["cmdline"] = cmdline
    return image


def _tools(ctx) -> list[str]:
    try:
        return dmverity.tools()
    except DiskImageError as e:
        raise ctx.fail(f"verity cannot be built here: {e}", attr="verity",
                       hint="install cryptsetup-bin (dev/setup.sh lists every package)") from None


@action_function("LkVerity", version=1)
def verity_step(ctx: ExecContext) -> None:
    src, base = (ctx.path(i) for i in ctx.inputs)
    image, cmdline = (ctx.path(o) for o in ctx.outputs)
    work = ctx.path(".work")
    work.mkdir()
    shutil.copyfile(src, image)
    try:
        v = dmverity.append_hash_tree(image, workdir=work)
        cmdline.write_text(dmverity.with_verity(base.read_text(), v))
    except DiskImageError as e:
        raise ActionFailed(str(e)) from None


# Where the packages keep libraries (bookworm's are not merged into usr/ yet), in the
# loader's search order.
_LIB_DIRS = ("lib/x86_64-linux-gnu/", "usr/lib/x86_64-linux-gnu/", "lib64/", "lib/", "usr/lib/")


def dm_tools(debs: list) -> tuple[bytes, object]:
    """dmsetup's bytes, and a soname lookup over the libraries the packages hold."""
    from forge.formats.debian.errors import DebError
    from forge.formats.debian.package import open_data_tar
    files: dict[str, bytes | str] = {}  # path -> contents, or a symlink's target
    dmsetup = None
    for deb in debs:
        try:
            with open_data_tar(deb) as tf:
                for m in tf:
                    path = m.name.lstrip("./")
                    if m.isfile() and path in ("sbin/dmsetup", "usr/sbin/dmsetup"):
                        dmsetup = tf.extractfile(m).read()
                    elif path.startswith(_LIB_DIRS) and (m.isfile() or m.issym()):
                        files[path] = tf.extractfile(m).read() if m.isfile() else m.linkname
        except (DebError, OSError) as e:
            raise ActionFailed(f"{deb}: {e}") from None
    if dmsetup is None:
        raise ActionFailed(f"none of {', '.join(str(d) for d in debs)} holds sbin/dmsetup")

    def find(soname: str) -> bytes | None:
        for d in _LIB_DIRS:
            path = f"{d}{soname}"
            for _ in range(8):  # symlinks inside the packages, e.g. libudev.so.1 -> .so.1.7.5
                got = files.get(path)
                if isinstance(got, str):
                    path = posixpath.normpath(got.lstrip("/") if got.startswith("/")
                                              else f"{path.rsplit('/', 1)[0]}/{got}")
                    continue
                if got is not None:
                    return got
                break
        return None
    return dmsetup, find


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(verity_step)
