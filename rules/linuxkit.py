"""`linuxkit_image`: an OS image from a LinuxKit assembly (YAML), as independent actions.

The plan for an assembly named N (see docs/linuxkit.md):

    each distinct image  -> LkUnpack: its layers flattened once into rootfs.tar (+ config)
    kernel               -> LkKernelFragment: modules (kernel.tar) + etc/forge/modules.load
    each init image      -> its flattened rootfs.tar is the fragment itself
    each onboot/onshutdown/service entry -> LkBundle: containers/<section>/<dir>/ with
                            config.json, runtime.json and rootfs/ (or lower/ when writable)
    files, each volume   -> LkFiles, LkVolume
    each fragment        -> LkSegment: one compressed newc cpio segment
    LkInitrd             -> N-initrd.img: [ucode.cpio] + the segments, concatenated
    LkBootFiles          -> N-kernel, N-cmdline
    each other format    -> one action from kernel + initrd + cmdline (rules/disk.py), or
                            from the fragments (`tar`)

Changing one service reruns its bundle, its segment, the concatenation and the formats.
"""

from __future__ import annotations

import json
import tarfile

from forge.api import (ActionFailed, AnalysisError, Artifact, ExecContext, LoadError, Location,
                       action_function, attr, did_you_mean, parse_label, rule)
from forge.formats.linuxkit.errors import AssemblyError, Loc
from forge.formats.linuxkit import assembly as asmlib
from forge.formats.linux import cpio
from forge.formats.linuxkit.runtime import runtime_config
from forge.formats.linux.fragments import FragmentWriter

from . import arch as archs
from . import compressors, disk, sbom, verity
from .lkpkg import package_for
from .oci import pinned, pull_action

COMPRESSIONS = ("gzip", "zstd", "none")
_SEGMENT_EXT = {"gzip": ".cpio.gz", "zstd": ".cpio.zst", "none": ".cpio"}
MODULES_LOAD = "etc/forge/modules.load"
# What `linuxkit build` makes without a kernel: the root filesystem as a tar (a `docker`
# format, where forge has one, is the same tar with a Dockerfile).
KERNEL_FREE_FORMATS = ("tar", "docker")


# --- reading the assembly ---------------------------------------------------------------

def _is_label(text: str) -> bool:
    return text.startswith(("//", ":", "@"))


def _parse(files: list[tuple[str, str]]) -> asmlib.Assembly:
    try:
        return asmlib.load(files)
    except AssemblyError as e:
        where = e.where if isinstance(e.where, Loc) else None
        loc = Location(where.file, where.line, where.col) if where else None
        raise LoadError(e.message, location=loc, hint=e.hint) from None


def _assembly_labels(attrs) -> list:
    return [attrs.assembly, *attrs.overlays]


def implicit_images(src) -> list:
    """The forge labels an assembly names as images (not through `images` aliases)."""
    asm = _parse([(src.path(lb), src.read(lb)) for lb in _assembly_labels(src.attrs)])
    aliases = set(src.attrs.images)
    found = []
    for text, loc in _image_uses(asm):
        if text not in aliases and _is_label(text):
            found.append((text, Location(loc.file, loc.line, loc.col) if loc else None))
    return found


def _image_uses(asm: asmlib.Assembly) -> list[tuple[str, Loc | None]]:
    uses = []
    if asm.kernel and asm.kernel.image:
        uses.append((asm.kernel.image, asm.kernel.loc))
    uses += list(zip(asm.init, asm.init_locs))
    uses += [(e.image, e.locs.get("image", e.loc)) for e in asm.entries()]
    uses += [(v.image, v.loc) for v in asm.volumes if v.image]
    return uses


# --- the rule -----------------------------------------------------------------------------

@rule("linuxkit_image", version=1, implicit_deps=implicit_images, doc="""An OS image from a
LinuxKit assembly (LinuxKit's YAML, unchanged). `image:` values may be registry references
(pinned in forge.lock), forge labels, or names mapped to targets by `images`. Each image is
unpacked once, each entry is its own cached fragment and initrd segment, each format its own
action. `forge run` boots it under QEMU. Its SBOM is `NAME.sbom.spdx.json`, also at the
image's root as `/sbom.spdx.json` (docs/supply-chain.md).""", attrs={
    "assembly": attr.label(mandatory=True, doc="The assembly YAML file."),
    "overlays": attr.label_list(doc="More assembly files merged after it, as `linuxkit build "
                                "a.yml b.yml` does (kernel keys replaced, lists appended)."),
    "images": attr.label_dict(doc='Image names used in the assembly mapped to image targets, '
                              'e.g. {"redis": "//images/redis:image"}.'),
    "formats": attr.string_list(default=["kernel+initrd"], doc="Output formats: "
                                + ", ".join(disk.FORMATS) + "."),
    "compression": attr.string(default="gzip", values=COMPRESSIONS,
                               doc="Compression of each initrd segment."),
    "platform": attr.string(default="", doc="Platform of pulled images; default: linux/<arch>."),
    **archs.attrs(multi=False),
    "packages": attr.label_list(doc="linuxkit_package targets: an `image:` equal to one's "
                                "tag (linuxkit/foo:<hash>) is that target, not a pull."),
    "firmware": attr.label(doc="Boot firmware of the formats that need it: an rpi_firmware "
                           "target for rpi3."),
    "verity": attr.bool(default=False, doc="A verified root: the kernel+squashfs or "
                        "kernel+erofs image (the one format, with at most a uki beside it, "
                        "which then embeds the boot initrd and this command line) gets a "
                        "dm-verity hash tree, N-cmdline its root hash, and the boot initrd "
                        "opens the root through dm-verity (docs/supply-chain.md)."),
    "uki_stub": attr.label(doc="A uki_stub target: systemd's EFI stub, which the `uki` format "
                           "and `efi_boot = \"uki\"` build on."),
    "efi_boot": attr.string(default="grub", values=disk.EFI_BOOTS, doc="What the EFI disks "
                            "(iso-efi, iso-efi-initrd, raw-efi, qcow2-efi) start as "
                            "EFI/BOOT/BOOTX64.EFI: grub, or uki (the unified kernel image, "
                            "needs uki_stub)."),
    "secure_boot_key": attr.label_list(doc="A Secure Boot db key: a PEM private key and its "
                                       "PEM certificate (two files, e.g. [\"db.key\", "
                                       "\"db.crt\"]). forge signs the UKI and every EFI "
                                       "binary it puts on an ESP with it (sbsign)."),
})
def linuxkit_image(ctx):
    for fmt in ctx.attr.formats:
        if fmt not in disk.FORMATS:
            raise ctx.fail(f"unknown format '{fmt}'", attr="formats",
                           hint=did_you_mean(fmt, disk.FORMATS)
                           or f"formats are: {', '.join(disk.FORMATS)}")
    disk.check_file_names(ctx, ctx.attr.formats, ctx.label.name)
    disk.check_secure_boot(ctx, ctx.attr.formats)
    arch = archs.arch_of(ctx)
    other = [f for f in ctx.attr.formats if f not in disk.ANY_ARCH]
    if arch != "amd64" and other:
        raise ctx.fail(f"format {other[0]} is built for amd64 only; an {arch} image builds "
                       f"{', '.join(disk.ANY_ARCH)}", attr="formats",
                       hint="drop it: disk images for arm64 need GRUB's arm64-efi modules, which "
                       "forge does not fetch yet")
    if ctx.attr.verity:
        verity.check(ctx, list(ctx.attr.formats), arch, tuple(disk.FORMATS))
    arts = [a for lb in _assembly_labels(ctx.attr) for a in ctx.dep(lb).files]
    asm = _parse([(a.path, ctx.read_source(a)) for a in arts])
    if asm.kernel is None or not asm.kernel.image:
        # As `linuxkit build`: an assembly without a kernel makes a root filesystem only.
        need = [f for f in ctx.attr.formats if f not in KERNEL_FREE_FORMATS]
        if need:
            raise ctx.fail(f"format '{need[0]}' needs a kernel, and the assembly "
                           f"{', '.join(a.path for a in arts)} has no `kernel.image`", attr="formats",
                           hint="add `kernel: {image: //pkg:kernel, cmdline: \"console=ttyS0\"}` to "
                           "the assembly, or build only " + " or ".join(
                               f for f in KERNEL_FREE_FORMATS if f in disk.FORMATS))
    return _Planner(ctx, asm).plan()


class _Planner:
    def __init__(self, ctx, asm: asmlib.Assembly):
        self.ctx, self.asm = ctx, asm
        self.name = ctx.label.name
        self.arch = archs.arch_of(ctx)  # every image used is taken for this architecture
        self.platform = ctx.attr.platform or archs.platform(self.arch)
        self.ids = asmlib.allocate_ids(asm)
        self.layouts: dict[str, object] = {}   # image text -> layout artifact
        self.kinds: dict[str, str] = {}        # image text -> "image" | "kernel" (a kernel target)
        self.unpacked: dict[str, object] = {}  # layout path -> LkUnpack output dir
        self.fragments: list[tuple[str, object]] = []
        self.outside: list[str] = []           # file sources read from outside the workspace
        self._infos: dict[str, object] = {}    # image text -> its target's info (not pulls)

    # images
    def layout(self, text: str, loc) -> object:
        if text in self.layouts:
            return self.layouts[text]
        ctx = self.ctx
        package = package_for(ctx, text, loc)
        if package is not None or text in ctx.attr.images or _is_label(text):
            label = package or ctx.attr.images.get(text) or parse_label(text, ctx.package)
            info = ctx.dep(label)
            self._infos[text] = info
            where = Location(loc.file, loc.line, loc.col) if loc else None
            self.kinds[text] = "image" if info.extra.get("image") else "kernel"
            if info.extra.get("image"):
                art = archs.image_for(ctx, info, self.arch, f"'{text}' ({label})", location=where)
            elif info.extra.get("kernel"):
                if info.extra.get("arch", "amd64") != self.arch:
                    raise AnalysisError(f"'{text}' is a kernel for {info.extra.get('arch', 'amd64')}"
                                        f", and this image is for {self.arch}", location=where,
                                        hint=f"name a kernel target with arch = \"{self.arch}\"")
                art = next(a for a in info.files if a.path == info.extra["kernel"])
            else:
                raise AnalysisError(f"'{text}' is not an image target (it has no image output)",
                                    location=where,
                                    hint="name a container_image, oci_pull, debian_rootfs or kernel target")
        else:
            try:
                ref = pinned(ctx, text)
            except AnalysisError as e:
                raise e.with_location(Location(loc.file, loc.line, loc.col) if loc else None)
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)
            art = pull_action(ctx, ref, self.platform, f"{self.name}.images/{safe}")
            self.kinds[text] = "image"
        self.layouts[text] = art
        return art

    def unpack(self, text: str, loc) -> object:
        layout = self.layout(text, loc)
        if self.kinds[text] == "kernel":
            raise AnalysisError(f"'{text}' is a kernel target; only `kernel.image` may name one",
                                location=Location(loc.file, loc.line, loc.col) if loc else None,
                                hint="name an image target here (container_image, oci_pull, ...)")
        if layout.path not in self.unpacked:
            out = self.ctx.declare_dir(f"{self.name}.unpacked/{len(self.unpacked)}")
            self.ctx.call("LkUnpack", {"image": text, "platform": self.platform},
                          inputs=[layout], outputs=[out], mnemonic="LkUnpack",
                          description=f"LkUnpack {text}")
            self.unpacked[layout.path] = out
        return self.unpacked[layout.path]

    # fragments
    def kernel(self) -> object:
        """The kernel directory (kernel, kernel.tar, modules.load[, ucode.cpio]): a `kernel`
        target's output as it is, or extracted from an image in LinuxKit's kernel layout."""
        k, ctx = self.asm.kernel, self.ctx
        art = self.layout(k.image, k.loc)
        if self.kinds[k.image] != "kernel":
            out = ctx.declare_dir(f"{self.name}.kernel")
            ctx.call("KernelFromImage", {"modules": [], "binary": k.binary, "tar": k.tar or "",
                                         "ucode": k.ucode or "", "platform": self.platform},
                     inputs=[art], outputs=[out], mnemonic="KernelFromImage")
            art = out
        frag = ctx.declare(f"{self.name}.rootfs/kernel.tar")
        ctx.call("LkKernelFragment", {"modules": k.tar is not None}, inputs=[art],
                 outputs=[frag], mnemonic="LkKernelFragment")
        self.fragments.append(("kernel", frag))
        return art

    def entries(self) -> None:
        for section in asmlib.SECTIONS:
            for i, e in enumerate(getattr(self.asm, section)):
                d = f"containers/{section}/" + (e.name if section == "services" else f"{i:03d}-{e.name}")
                src = self.unpack(e.image, e.locs.get("image", e.loc))
                frag = self.ctx.declare(f"{self.name}.rootfs/{section}-{i:03d}-{e.name}.tar")
                e = self._check(e)
                # No line numbers in the params: moving an entry must not rebuild it.
                params = {"dir": d, "section": section, "name": e.name, "image": e.image,
                          "raw": e.raw, "ids": self.ids}
                self.ctx.call("LkBundle", params, inputs=[src], outputs=[frag],
                              mnemonic="LkBundle", description=f"LkBundle {self.ctx.label} [{d}]")
                self.fragments.append((f"{section}/{e.name}", frag))

    def _check(self, e: asmlib.ImageEntry) -> asmlib.ImageEntry:
        """Errors in the entry's own keys, found now with their lines (and by --nobuild);
        what is left for the step is the image label, which it names. Returns the entry
        with its volume binds resolved."""
        import dataclasses
        try:
            e = dataclasses.replace(e, raw=asmlib.volume_binds(e, self.asm.volumes))
            runtime_config(e, {}, {}, self.ids)
            return e
        except AssemblyError as err:
            w = err.where
            raise AnalysisError(err.message, location=Location(w.file, w.line, w.col)
                                if isinstance(w, Loc) else None, hint=err.hint) from None

    def files(self) -> None:
        if not self.asm.files:
            return
        ctx = self.ctx
        items, inputs = [], []
        for f in self.asm.files:
            item = {"path": f.path, "mode": f.mode, "uid": self._id(f.uid), "gid": self._id(f.gid)}
            if f.directory:
                item["directory"] = True
            elif f.symlink is not None:
                item["symlink"] = f.symlink
            elif f.contents is not None:
                item["contents"] = f.contents
            elif f.metadata is not None:
                item["contents"] = self._metadata(f.metadata)
            elif f.source is not None:
                got = self._source(f)
                if got is None:
                    continue
                if "input" in got:
                    item["source"] = got["input"].path
                    inputs.append(got["input"])
                else:
                    item.update(host=got["host"], sha256=got["sha256"])
            else:
                item["contents"] = ""
            items.append(item)
        frag = ctx.declare(f"{self.name}.rootfs/files.tar")
        local = ""
        if self.outside:
            local = (f"{ctx.label}: the assembly's files read {', '.join(self.outside)}, outside "
                     "the workspace: the build depends on this machine, and its LkFiles step is "
                     "neither taken from nor uploaded to a remote cache")
        ctx.call("LkFiles", {"files": items}, inputs=inputs, outputs=[frag], mnemonic="LkFiles",
                 local=local)
        self.fragments.append(("files", frag))

    def _id(self, v) -> int:
        if v is None or v in ("", "root"):
            return 0
        return v if isinstance(v, int) else self.ids[v]

    def _source(self, f: asmlib.FileEntry) -> dict | None:
        """The file entry's `source`, read as `linuxkit build` reads it: `~/` is the home
        directory, other paths are relative to the assembly (LinuxKit: to the directory it
        runs in). A file of the workspace is an input like any other; one outside it (an
        absolute path, `~/`, or `..` past the workspace root, which LinuxKit reads too) is
        read now, its digest goes in the step's key and the plan cache watches it, and the
        step is local-only. None: missing and `optional`, so skipped as LinuxKit does."""
        import hashlib
        import os
        import posixpath
        loc = f.locs.get("source", f.loc)
        where = Location(loc.file, loc.line, loc.col)
        src = f.source
        if src.startswith("~/") and len(src) > 2:
            src = os.path.expanduser("~") + src[1:]
        root = str(self.ctx.workspace_root)
        if posixpath.isabs(src):
            full = posixpath.normpath(src)
        else:
            full = posixpath.normpath(posixpath.join(root, posixpath.dirname(loc.file), src))
        rel = posixpath.relpath(full, root)
        missing_hint = ("fix the path (relative to the assembly file, or absolute, or ~/...) "
                        "or set `optional: true` to leave the file out when it is missing")
        if rel != ".." and not rel.startswith("../"):
            try:
                art = self.ctx.source_file(rel)
            except (FileNotFoundError, IsADirectoryError):
                if f.optional:
                    return None
                raise ActionFailed(f"file '{f.path}': source {f.source} ({rel}) does not exist "
                                   "or is not a file", location=where, hint=missing_hint) from None
            return {"input": art}
        data = self.ctx.host_file(full)
        if data is None:
            if f.optional:
                return None
            raise ActionFailed(f"file '{f.path}': source {f.source} ({full}) cannot be read",
                               location=where, hint=missing_hint)
        self.outside.append(full)
        return {"host": full, "sha256": hashlib.sha256(data).hexdigest()}

    def _metadata(self, kind: str) -> str:
        a = self.asm
        doc = {"kernel": dict(a.kernel.raw) if a.kernel else {}, "init": a.init,
               **{s: [e.raw for e in getattr(a, s)] for s in asmlib.SECTIONS},
               "files": [f.raw for f in a.files], "volumes": [v.raw for v in a.volumes]}
        if kind == "json":
            return json.dumps(doc, indent=2, sort_keys=True) + "\n"
        import yaml
        return yaml.safe_dump(doc, sort_keys=True)

    def volumes(self) -> None:
        for v in self.asm.volumes:
            inputs = []
            if v.image and v.format == "filesystem":
                inputs = [self.unpack(v.image, v.loc)]  # `platforms` is for oci, as in LinuxKit
            elif v.image:
                inputs = self._volume_layouts(v)
            frag = self.ctx.declare(f"{self.name}.rootfs/volume-{v.name}.tar")
            self.ctx.call("LkVolume", {"name": v.name, "format": v.format if v.image else "none",
                                       "readonly": v.readonly},
                          inputs=inputs, outputs=[frag], mnemonic="LkVolume")
            self.fragments.append((f"volumes/{v.name}", frag))

    def _volume_layouts(self, v: asmlib.Volume) -> list:
        """An oci volume's layouts: one per `platforms` item (LinuxKit writes one layout
        holding each), else the image for the target's platform."""
        loc = v.loc
        if not v.platforms:
            return [self.layout(v.image, v.loc)]
        if v.image in self.ctx.attr.images or _is_label(v.image):
            raise AnalysisError(f"volume '{v.name}' asks for platforms {', '.join(v.platforms)}, but "
                                f"'{v.image}' is a forge target, built for one platform",
                                location=Location(loc.file, loc.line, loc.col),
                                hint="name a registry reference to pull several platforms, or drop `platforms`")
        try:
            ref = pinned(self.ctx, v.image)
        except AnalysisError as e:
            raise e.with_location(Location(loc.file, loc.line, loc.col))
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in v.image)
        return [pull_action(self.ctx, ref, p, f"{self.name}.volumes/{v.name}/{p.replace('/', '_')}-{safe}")
                for p in dict.fromkeys(v.platforms)]

    def sbom(self, kernel_dir):
        """The image's SBOM, also put at its root (sbom.spdx.json) as LinuxKit does."""
        images = {}
        for text, art in self.layouts.items():
            if self.kinds.get(text) != "image":
                continue
            info = self._infos.get(text)
            path = ((info.extra.get("sbom") or {}).get(self.arch)) if info is not None else None
            images[text] = (Artifact(path, source=False) if path else None, art)
        files = next((f for what, f in self.fragments if what == "files"), None)
        doc, frag = sbom.os_sbom(self.ctx, self.name, images, kernel_dir, files, self.platform)
        self.fragments.append(("sbom", frag))
        return doc

    # the whole plan
    def plan(self):
        ctx = self.ctx
        has_kernel = bool(self.asm.kernel and self.asm.kernel.image)
        kernel_dir = self.kernel() if has_kernel else None
        for i, (ref, loc) in enumerate(zip(self.asm.init, self.asm.init_locs)):
            self.fragments.append((f"init/{i}", self.unpack(ref, loc)))
        self.entries()
        self.volumes()
        self.files()
        self.sbom_doc = self.sbom(kernel_dir)
        comp = ctx.attr.compression
        segments = []
        for n, (what, frag) in enumerate(self.fragments):
            seg = ctx.declare(f"{self.name}.initrd/{n:03d}-{what.replace('/', '-')}{_SEGMENT_EXT[comp]}")
            ctx.call("LkSegment", {"compression": comp, "compressor": compressors.param(comp),
                                   "base": n == 0}, inputs=[frag],
                     outputs=[seg], mnemonic="LkSegment", description=f"LkSegment {ctx.label} [{what}]")
            segments.append(seg)
        if not has_kernel:
            outputs = {fmt: disk.plan_format(ctx, fmt, self.name, None, None,
                                             [f for _, f in self.fragments]) for fmt in ctx.attr.formats}
            files = [a for arts in outputs.values() for a in arts] + [self.sbom_doc, sbom.cdx_of(self.sbom_doc)]
            formats = {f: [a.path for a in arts] for f, arts in outputs.items()}
            return ctx.info(files=files, formats=formats,  # `forge run` says it has nothing to boot
                            run={"runner": "QemuRun", "params": {"name": self.name, "formats": formats}})
        initrd = ctx.declare(f"{self.name}-initrd.img")
        ctx.call("LkInitrd", {}, inputs=[kernel_dir, *segments], outputs=[initrd], mnemonic="LkInitrd")
        # With verity, N-cmdline is LkVerity's (the root hash added to this one).
        kernel = ctx.declare(f"{self.name}-kernel")
        cmdline = ctx.declare(f"{self.name}.verity/cmdline" if ctx.attr.verity else f"{self.name}-cmdline")
        ctx.call("LkBootFiles", {"cmdline": self.asm.kernel.cmdline}, inputs=[kernel_dir],
                 outputs=[kernel, cmdline], mnemonic="LkBootFiles")
        boot = {"kernel": kernel, "initrd": initrd, "cmdline": cmdline}
        dm_debs = verity.fetch_debs(ctx, self.name) if ctx.attr.verity else None
        outputs = {}
        for fmt in verity.order(ctx.attr.formats) if dm_debs else ctx.attr.formats:
            outputs[fmt] = disk.plan_format(ctx, fmt, self.name, boot, kernel_dir,
                                            [f for _, f in self.fragments], arch=self.arch,
                                            dm_debs=dm_debs)
            if dm_debs and "boot-initrd" in boot:  # a UKI after it embeds the verity boot
                boot["initrd"] = boot["boot-initrd"]
        cmdline = boot["cmdline"]
        files = [a for arts in outputs.values() for a in arts] + [self.sbom_doc, sbom.cdx_of(self.sbom_doc)]
        return ctx.info(files=files, kernel=kernel.path, sbom=self.sbom_doc.path, initrd=initrd.path,
                        cmdline=cmdline.path,
                        formats={f: [a.path for a in arts] for f, arts in outputs.items()},
                        boot_files=[kernel, initrd, cmdline], arch=self.arch,
                        run={"runner": "QemuRun", "params": {
                            "name": self.name, "arch": self.arch,
                            "formats": {f: [a.path for a in arts] for f, arts in outputs.items()}}})


# --- steps ------------------------------------------------------------------------------

def _in_dir(ctx: ExecContext, i: int, name: str):
    p = ctx.path(ctx.inputs[i])
    return p / name if p.is_dir() else p


@action_function("LkUnpack", version=2)
def unpack_step(ctx: ExecContext) -> None:
    """An image's layers flattened, with LinuxKit's drops and replacements, + its config."""
    import tempfile
    from forge.formats.image.layer_write import flatten
    from forge.formats.common.files import canonical_json
    from forge.formats.image.errors import LayoutError
    from forge.formats.image.layout import read_image
    try:
        img = read_image(ctx.path(ctx.inputs[0]), ctx.params["platform"])
    except LayoutError as e:
        raise ActionFailed(f"{ctx.params['image']}: {e}") from None
    out = ctx.path(ctx.outputs[0])
    (out / "config.json").write_bytes(canonical_json(img.config))
    with tempfile.TemporaryFile(dir=ctx.scratch) as flat:
        flatten([b for _, b in img.layers], flat, mtime=None)
        flat.seek(0)
        with tarfile.open(fileobj=flat, mode="r:") as src, \
                open(out / "rootfs.tar", "wb") as f, FragmentWriter(f, mtime=ctx.source_date_epoch) as w:
            w.copy_tree(src, drop=cpio.LINUXKIT_DROP, replace=cpio.LINUXKIT_REPLACE)


@action_function("LkKernelFragment", version=1)
def kernel_fragment_step(ctx: ExecContext) -> None:
    kdir = ctx.path(ctx.inputs[0])
    with open(ctx.path(ctx.outputs[0]), "wb") as f, FragmentWriter(f, mtime=ctx.source_date_epoch) as w:
        if ctx.params["modules"] and (kdir / "kernel.tar").is_file():
            with tarfile.open(kdir / "kernel.tar") as src:
                w.copy_tree(src)
        load = kdir / "modules.load"
        w.file(MODULES_LOAD, load.read_bytes() if load.is_file() else b"")


@action_function("LkBundle", version=2)
def bundle_step(ctx: ExecContext) -> None:
    """One entry's OCI bundle. Writable entries (LinuxKit's default) get their image in
    lower/ and an empty rootfs/ where the init mounts an overlay; read-only ones in rootfs/."""
    p = ctx.params
    entry = asmlib.ImageEntry(p["section"], p["name"], p["image"], Loc(p["dir"], 0, 0),
                              p["raw"], {})
    src = ctx.path(ctx.inputs[0])
    image_config = json.loads((src / "config.json").read_text())
    try:
        config, runtime = runtime_config(entry, image_config, None, p["ids"])
    except AssemblyError as e:
        raise ActionFailed(str(e), hint=e.hint) from None
    readonly = config["root"].get("readonly", False)
    d = p["dir"]
    with open(ctx.path(ctx.outputs[0]), "wb") as f, FragmentWriter(f, mtime=ctx.source_date_epoch) as w:
        w.directory(d)
        w.file(f"{d}/config.json", json.dumps(config, indent=4).encode() + b"\n")
        w.file(f"{d}/runtime.json", json.dumps(runtime, indent=4).encode() + b"\n")
        if not readonly:
            w.directory(f"{d}/rootfs")
        with tarfile.open(src / "rootfs.tar") as tf:
            # runc mounts on these; an image from scratch may lack them
            w.copy_tree(tf, f"{d}/rootfs" if readonly else f"{d}/lower", extra_dirs=cpio.MOUNT_POINTS)


def _leading_dir_mode(mode: int) -> int:
    """LinuxKit gives the directories it adds above a file entry the entry's mode, with
    search (x) added wherever read or write is allowed: 0600 -> 0700, 0644 -> 0755."""
    for rwx, x in ((0o700, 0o100), (0o070, 0o010), (0o007, 0o001)):
        if mode & rwx:
            mode |= x
    return mode


@action_function("LkFiles", version=2)  # 2: leading directories as LinuxKit makes them
def files_step(ctx: ExecContext) -> None:
    import posixpath
    with open(ctx.path(ctx.outputs[0]), "wb") as f, FragmentWriter(f, mtime=ctx.source_date_epoch) as w:
        for it in ctx.params["files"]:
            ids = {"uid": it["uid"], "gid": it["gid"]}
            parts = posixpath.normpath("/" + it["path"]).strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):  # the first entry below a directory makes it
                w.directory("/".join(parts[:i]), _leading_dir_mode(it["mode"]), **ids)
            if it.get("directory"):
                w.directory(it["path"], it["mode"], **ids)
            elif "symlink" in it:
                w.symlink(it["path"], it["symlink"], **ids)
            elif "source" in it:
                w.file(it["path"], ctx.path(it["source"]).read_bytes(), it["mode"], **ids)
            elif "host" in it:
                w.file(it["path"], _host_file(it), it["mode"], **ids)
            else:
                w.file(it["path"], it["contents"].encode(), it["mode"], **ids)


def _host_file(it: dict) -> bytes:
    """A file source outside the workspace: its digest is in the key, so what is read
    must be what was planned."""
    import hashlib
    try:
        data = open(it["host"], "rb").read()
    except OSError as e:
        raise ActionFailed(f"file '{it['path']}': cannot read {it['host']}: {e.strerror}") from None
    if hashlib.sha256(data).hexdigest() != it["sha256"]:
        raise ActionFailed(f"file '{it['path']}': {it['host']} changed while building",
                           hint="build again")
    return data


@action_function("LkVolume", version=2)  # 2: lower/, merged/ and tmp/ as LinuxKit lays them out
def volume_step(ctx: ExecContext) -> None:
    """containers/volumes/<name>/: the contents in lower/, an empty merged/ where the init
    mounts the volume, and tmp/ (the mark of a writable volume, where the init mounts the
    tmpfs for its overlay's upper layer) unless the volume is read-only."""
    base = f"{asmlib.VOLUMES_DIR}/{ctx.params['name']}"
    fmt = ctx.params["format"]
    with open(ctx.path(ctx.outputs[0]), "wb") as f, FragmentWriter(f, mtime=ctx.source_date_epoch) as w:
        w.directory(base)
        w.directory(f"{base}/lower")
        if fmt == "filesystem":
            with tarfile.open(ctx.path(ctx.inputs[0]) / "rootfs.tar") as tf:
                w.copy_tree(tf, f"{base}/lower")
        elif fmt == "oci":
            _merged_layout(w, f"{base}/lower", [ctx.path(i) for i in ctx.inputs])
        if not ctx.params.get("readonly"):
            w.directory(f"{base}/tmp")
        w.directory(f"{base}/merged")


def _merged_layout(w: FragmentWriter, dest: str, layouts: list) -> None:
    """One OCI layout from several (one per platform): every blob once, and an index
    listing each layout's manifests."""
    from forge.formats.common.files import canonical_json
    manifests, blobs = [], {}
    for layout in layouts:
        index = json.loads((layout / "index.json").read_bytes())
        manifests += [m for m in index.get("manifests", []) if m not in manifests]
        for p in sorted(layout.rglob("*")):
            rel = p.relative_to(layout).as_posix()
            if rel != "index.json" and p.is_file():
                blobs.setdefault(rel, p)
    if len(layouts) == 1:
        index_bytes = (layouts[0] / "index.json").read_bytes()
    else:
        index_bytes = canonical_json({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                      "manifests": manifests})
    w.file(f"{dest}/index.json", index_bytes)
    for rel in sorted(blobs):
        w.file(f"{dest}/{rel}", blobs[rel].read_bytes())


@action_function("LkSegment", version=3)  # 3: the compressor in the key
def segment_step(ctx: ExecContext) -> None:
    base = ctx.params["base"]
    compressors.check(ctx, ctx.params["compression"])
    with open(_in_dir(ctx, 0, "rootfs.tar"), "rb") as src, open(ctx.path(ctx.outputs[0]), "wb") as out, \
            cpio.open_compressed(out, ctx.params["compression"]) as z:
        cpio.write_tree_from_tar(src, z, mtime=ctx.source_date_epoch, drop=(), replace=None,
                                 extra_dirs=cpio.MOUNT_POINTS if base else (), console=base)


@action_function("LkInitrd", version=1)
def initrd_step(ctx: ExecContext) -> None:
    """Early microcode must come first and uncompressed; then the segments in order."""
    ucode = ctx.path(ctx.inputs[0]) / "ucode.cpio"
    parts = ([ucode] if ucode.is_file() else []) + [ctx.path(i) for i in ctx.inputs[1:]]
    with open(ctx.path(ctx.outputs[0]), "wb") as out:
        cpio.concatenate(parts, out)


@action_function("LkBootFiles", version=1)
def boot_files_step(ctx: ExecContext) -> None:
    import shutil
    shutil.copyfile(ctx.path(ctx.inputs[0]) / "kernel", ctx.path(ctx.outputs[0]))
    ctx.path(ctx.outputs[1]).write_text(ctx.params["cmdline"])


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(linuxkit_image, unpack_step, kernel_fragment_step, bundle_step, files_step,
                 volume_step, segment_step, initrd_step, boot_files_step)
