"""Debian packages and kernels: `deb_package` (a .deb pinned by sha256 in forge.lock) and
`kernel` (the kernel and its modules from a Debian kernel package, unpacked in Python,
optionally cut down to the modules an OS needs, with their load order).

Output of `kernel`, a directory in LinuxKit's layout:

    kernel         the bootable image (boot/vmlinuz-<version> of the package)
    kernel.tar     lib/modules/<version>/... (only the kept modules), reproducible
    modules.load   the kept modules in load order, one path per line (for the init)
    version        the kernel release, e.g. 6.1.0-50-cloud-amd64
    package.json   from a package: what it was (forge.formats.debian.inventory, without
                   its file list), for the image's SBOM
    dtb/<vendor>/  with `dtbs`: the package's device trees of those vendors
                   (usr/lib/linux-image-<version>/<vendor>/*.dtb; arm64's linux-image-arm64
                   has them, the cloud kernel has no broadcom ones)
"""

from __future__ import annotations

import json
import tarfile

from forge.api import ActionFailed, ExecContext, action_function, attr, pin_resolver, rule
from forge.formats.debian.errors import DebError
from forge.formats.linux.errors import ModuleError
from forge.formats.debian import archive
from forge.formats.debian.package import open_data_tar
from forge.formats.linux import modules as kmod
from forge.formats.linux.fragments import FragmentWriter

from . import arch as archs
from . import debtrust
from .debtrust import mirror_for, mirror_or_none

DOC_SUITE = "Debian suite whose package index is used."
COMPONENTS = ("main", "contrib", "non-free", "non-free-firmware")


def _pin_value(entry: dict) -> str:
    return json.dumps({k: entry[k] for k in ("Package", "Version", "Filename", "SHA256", "Size")},
                      sort_keys=True)


def _index(key: str, config: dict):
    """The verified index a pin is resolved from; nothing unverified is ever pinned."""
    suite, arch, spec = key.split("/", 2)
    component, _, spec = spec.rpartition("/")  # `suite/arch/[component/]name`: main if absent
    name, _, version = spec.partition("=")
    trust = debtrust.current(config, suite)
    try:
        index = archive.fetch_index(mirror_for(config), suite, component or "main", arch=arch,
                                    keyrings=trust.keyrings, insecure=trust.insecure)
    except (DebError, OSError) as e:
        raise debtrust.failure(e, trust, f"cannot resolve {name} in suite {suite}") from None
    return index, name, version or None


def _resolve(index, name, version):
    try:
        return archive.resolve(index, name, version)
    except DebError as e:
        raise ActionFailed(str(e)) from None


_PLACEHOLDER = json.dumps({"Package": "unresolved", "Version": "0", "Filename": "unresolved.deb",
                           "SHA256": "0" * 64, "Size": "0"})


@pin_resolver("deb", placeholder=_PLACEHOLDER)
def resolve_deb(key: str, config: dict) -> str:
    """`suite/arch/[component/]name[=version]` -> the index entry of that package, as JSON."""
    index, name, version = _index(key, config)
    return _pin_value(_resolve(index, name, version))


@pin_resolver("debkernel", placeholder=_PLACEHOLDER)
def resolve_kernel(key: str, config: dict) -> str:
    """Like `deb`, but a metapackage (linux-image-cloud-amd64) is followed to the
    versioned kernel package it depends on."""
    index, name, version = _index(key, config)
    entry = _resolve(index, name, version)
    for _ in range(3):
        nxt = [alt for clause in archive.depends(entry) for alt in clause
               if alt.startswith("linux-image-") and alt != entry["Package"]]
        if not nxt:
            break
        entry = _resolve(index, nxt[0], None)
    return _pin_value(entry)


DOC_KEYRING = ("The keyring the suite must be signed with: an absolute path, or a label of a "
               "file of the workspace; default: [debian] keyring in forge.toml, else what apt "
               "trusts for the mirror (docs/trust.md).")


def pinned_deb(ctx, kind: str, package: str = "", component: str = "main",
               arch: str = "") -> dict:
    """The pin of the target's package (or of `package` in `component`, for rules that
    fetch several), resolved (the first time) from a verified suite."""
    trust = debtrust.trust_for(ctx, ctx.attr.suite)
    # main keeps its old key, so the pins already in forge.lock stay valid.
    comp = "" if component == "main" else f"{component}/"
    key = f"{ctx.attr.suite}/{arch or archs.arch_of(ctx)}/{comp}{package or package_of(ctx)}"
    return dict(json.loads(debtrust.pin(ctx, kind, key, trust)), _trust=trust)


def package_of(ctx) -> str:
    """The package to fetch: given, or (for `kernel`) Debian's cloud kernel of the arch."""
    return ctx.attr.package or f"linux-image-cloud-{archs.arch_of(ctx)}"


def fetch_action(ctx, pin: dict, name: str):
    out = ctx.declare(name)
    # The trusted keys are in the key: a package pinned through other keys is another fetch.
    ctx.call("DebFetch", {"filename": pin["Filename"], "sha256": pin["SHA256"],
                          "size": pin["Size"], **pin["_trust"].params()},
             inputs=[], outputs=[out], mnemonic="DebFetch",
             pool="network", description=f"DebFetch {pin['Package']} {pin['Version']}",
             # the mirror of this machine, as the step downloads from it (not in the key)
             origins=[(pin["Filename"].rsplit("/", 1)[-1],
                       f"{(mirror_or_none(ctx.config) or '').rstrip('/')}/{pin['Filename']}",
                       f"sha256:{pin['SHA256']}")])
    return out


@rule("deb_package", version=1, doc="A Debian package from the mirror's index, pinned by "
      "sha256 in forge.lock (resolved once; `forge lock` refreshes).", attrs={
          "package": attr.string(mandatory=True, doc="Package name, optionally name=version."),
          "suite": attr.string(default="bookworm", doc=DOC_SUITE),
          **archs.attrs(multi=False),
          "component": attr.string(default="main", values=COMPONENTS, doc="Archive component "
                                   "whose index holds the package (raspi-firmware is in "
                                   "non-free-firmware)."),
          "keyring": attr.string(default="", doc=DOC_KEYRING),
      })
def deb_package(ctx):
    pin = pinned_deb(ctx, "deb", component=ctx.attr.component)
    out = fetch_action(ctx, pin, f"{ctx.label.name}.deb")
    return ctx.info(files=[out], deb=out.path, package=pin["Package"], version=pin["Version"],
                    arch=archs.arch_of(ctx))


@action_function("DebFetch", version=1)
def deb_fetch(ctx: ExecContext) -> None:
    if ctx.offline:
        raise ActionFailed(f"{ctx.params['filename']} is not cached and --offline forbids "
                           "downloading it")
    p = ctx.params
    entry = {"Filename": p["filename"], "SHA256": p["sha256"], "Size": p["size"]}
    try:
        archive.download(mirror_for(ctx.config), entry, ctx.path(ctx.outputs[0]))
    except (DebError, OSError) as e:
        raise debtrust.failure(e, None, f"cannot download {p['filename']}") from None


@rule("kernel", version=1, doc="""A kernel and its modules: from a Debian kernel package
(`deb`, or `package` resolved through the mirror), from an OCI image in LinuxKit's kernel
layout (`image`: files `kernel`, `kernel.tar`, optionally `ucode.cpio` at the root), or from
a URL with its sha256 (a .deb, or a bare kernel image).""",
      attrs={
          "image": attr.label(doc="An image target in LinuxKit's kernel layout."),
          "deb": attr.label(doc="A deb_package target (or a .deb file); default: `package`."),
          "package": attr.string(default="", doc="Kernel package (a metapackage is followed) "
                                 "when `deb` is not given; default: linux-image-cloud-<arch>."),
          "suite": attr.string(default="bookworm", doc=DOC_SUITE),
          **archs.attrs(multi=False),
          "url": attr.string(default="", doc="A kernel from a URL: a .deb kernel package, or a "
                             "bare kernel image (bzImage) without modules."),
          "sha256": attr.string(default="", doc="The sha256 of what `url` serves (required with url)."),
          "modules": attr.string_list(doc="Modules to keep, with their dependencies; empty: "
                                      "keep every module."),
          "keyring": attr.string(default="", doc=DOC_KEYRING + " Only with `package`."),
          "dtbs": attr.string_list(doc="Device-tree vendors to keep from a Debian kernel "
                                   "package, e.g. [\"broadcom\"] for the Raspberry Pi (rpi3)."),
      })
def kernel(ctx):
    info = _kernel(ctx)
    return ctx.info(files=info.files, kernel=info.extra["kernel"], arch=archs.arch_of(ctx))


def _kernel(ctx):
    out = ctx.declare_dir(ctx.label.name)
    bad = [v for v in ctx.attr.dtbs if not v or "/" in v or v.startswith(".")]
    if bad:
        raise ctx.fail(f"dtbs holds {bad[0]!r}, not a vendor directory name", attr="dtbs",
                       hint='name directories of the package\'s device trees, e.g. "broadcom"')
    if ctx.attr.dtbs and (ctx.attr.image or (ctx.attr.url and not ctx.attr.url.endswith(".deb"))):
        raise ctx.fail("dtbs are kept from a Debian kernel package only", attr="dtbs",
                       hint="use `package` or `deb`, or drop dtbs")
    if ctx.attr.keyring and (ctx.attr.image or ctx.attr.deb or ctx.attr.url):
        raise ctx.fail("keyring applies only to a kernel package from the mirror (`package`)",
                       attr="keyring", hint="drop it: image, deb and url are pinned by digest")
    if ctx.attr.image:
        if ctx.attr.deb:
            raise ctx.fail("give either image or deb, not both", attr="deb")
        arch = archs.arch_of(ctx)
        src = archs.image_for(ctx, ctx.deps("image")[0], arch, str(ctx.attr.image), "image")
        if src is None:
            raise ctx.fail(f"{ctx.attr.image} is not an image target", attr="image")
        ctx.call("KernelFromImage", {"modules": list(ctx.attr.modules),
                                     **({"platform": archs.platform(arch)} if arch != "amd64" else {})},
                 inputs=[src], outputs=[out], mnemonic="KernelFromImage")
        return ctx.info(files=[out], kernel=out.path)
    if ctx.attr.url:
        sha = ctx.attr.sha256.lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ctx.fail(f"sha256 must be 64 hex digits; got {ctx.attr.sha256!r}", attr="sha256",
                           hint="a URL is only fetched with the sha256 of what it serves")
        is_deb, arch = ctx.attr.url.endswith(".deb"), None
        src = ctx.declare(f"{ctx.label.name}.download{'.deb' if is_deb else ''}")
        ctx.call("HttpFetch", {"urls": [ctx.attr.url], "sha256": sha}, inputs=[], outputs=[src],
                 mnemonic="HttpFetch", pool="network",
                 origins=[(src.path.rsplit("/", 1)[-1], ctx.attr.url, f"sha256:{sha}")])
        if not is_deb:  # a bare kernel image: no modules come with it
            if ctx.attr.modules:
                raise ctx.fail("modules need a kernel package or image; this URL is a bare kernel",
                               attr="modules")
            ctx.call("KernelFromFile", {}, inputs=[src], outputs=[out], mnemonic="KernelFromFile")
            return ctx.info(files=[out], kernel=out.path)
    elif ctx.attr.deb:
        debs = ctx.files("deb")
        if len(debs) != 1:
            raise ctx.fail(f"deb must name one .deb file; it names {len(debs)}", attr="deb")
        src = debs[0]
    else:
        src = fetch_action(ctx, pinned_deb(ctx, "debkernel"), f"{ctx.label.name}.deb")
    params = {"modules": list(ctx.attr.modules)}
    if ctx.attr.dtbs:  # only when asked: the keys of kernels without dtbs stay as they were
        params["dtbs"] = sorted(set(ctx.attr.dtbs))
    ctx.call("KernelFromDeb", params, inputs=[src], outputs=[out], mnemonic="KernelFromDeb")
    return ctx.info(files=[out], kernel=out.path)


@action_function("KernelFromFile", version=1)
def kernel_from_file(ctx: ExecContext) -> None:
    import shutil
    out = ctx.path(ctx.outputs[0])
    shutil.copyfile(ctx.path(ctx.inputs[0]), out / "kernel")
    (out / "modules.load").write_text("")
    (out / "version").write_text("\n")


_KO = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _take_module(tf: tarfile.TarFile, m: tarfile.TarInfo, mods: dict) -> bool:
    """Keep `m` in `mods` (name -> (path, modinfo, bytes)) if it is a kernel module."""
    name = m.name.lstrip("./")
    if not (m.isfile() and "/modules/" in name and name.endswith(_KO)):
        return False
    data = tf.extractfile(m).read()
    info = kmod.modinfo(data)
    mods[kmod.module_name(name, info)] = (name, info, data)
    return True


def _vendor(name: str) -> str | None:
    parts = name.split("/")  # usr/lib/linux-image-<version>/<vendor>/.../x.dtb
    return parts[3] if len(parts) > 4 else None


@action_function("KernelFromDeb", version=2)  # 2: package.json
def kernel_from_deb(ctx: ExecContext) -> None:
    image = None
    mods: dict[str, tuple[str, dict, bytes]] = {}
    version = None
    vendors = ctx.params.get("dtbs", [])
    dtbs: dict[str, bytes] = {}
    from forge.formats.debian.inventory import copyright_path, record_of
    from forge.formats.debian.package import control_fields
    fields = control_fields(ctx.path(ctx.inputs[0]))
    wanted, copyright_text = copyright_path(fields.get("Package", "")), None
    # One pass in archive order: the data tar is xz, and going back would decompress again.
    with open_data_tar(ctx.path(ctx.inputs[0])) as tf:
        for m in tf:
            name = m.name.lstrip("./")
            if m.isfile() and name == wanted:
                copyright_text = tf.extractfile(m).read().decode("utf-8", "replace")
            elif m.isfile() and name.startswith("boot/vmlinuz-"):
                image = tf.extractfile(m).read()
                version = name[len("boot/vmlinuz-"):]
            elif vendors and m.isfile() and name.endswith(".dtb") and \
                    name.startswith("usr/lib/linux-image-") and _vendor(name) in vendors:
                dtbs["/".join(name.split("/")[3:])] = tf.extractfile(m).read()
            else:
                _take_module(tf, m, mods)
    if image is None:
        raise ActionFailed(f"{ctx.inputs[0]} holds no boot/vmlinuz-*: not a kernel package")
    missing = [v for v in vendors if not any(k.startswith(v + "/") for k in dtbs)]
    if missing:
        raise ActionFailed(f"{ctx.inputs[0]} has no device trees of {', '.join(missing)} "
                           "(usr/lib/linux-image-*/<vendor>/*.dtb); Debian's cloud kernels ship "
                           "few: use linux-image-arm64 for the Raspberry Pi")
    _write_kernel(ctx, image, version, mods)
    from forge.formats.common.files import canonical_json
    rec = record_of(ctx.path(ctx.inputs[0]), fields, copyright_text)
    (ctx.path(ctx.outputs[0]) / "package.json").write_bytes(canonical_json(rec))
    for rel, data in sorted(dtbs.items()):
        dest = ctx.path(ctx.outputs[0]) / "dtb" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)


def _write_kernel(ctx: ExecContext, image: bytes, version: str, mods: dict) -> None:
    """The output directory: the image, the kept modules (all when none are listed) in
    kernel.tar, their load order, the release."""
    out = ctx.path(ctx.outputs[0])
    wanted = ctx.params["modules"]
    try:
        order = kmod.load_order({k: v[1] for k, v in mods.items()}, wanted) if wanted \
            else sorted(mods)
    except ModuleError as e:
        raise ActionFailed(str(e).strip("'\"")) from None
    (out / "kernel").write_bytes(image)
    (out / "version").write_text(version + "\n")
    (out / "modules.load").write_text("".join(f"/{mods[n][0]}\n" for n in order) if wanted else "")
    with open(out / "kernel.tar", "wb") as f, FragmentWriter(f, mtime=ctx.source_date_epoch) as w:
        for path, data in sorted((mods[n][0], mods[n][2]) for n in order):
            w.file(path, data)


@action_function("KernelFromImage", version=2)
def kernel_from_image(ctx: ExecContext) -> None:
    """`binary`, `tar` and `ucode` are the assembly's kernel keys: the files' names in the
    image ("" for `tar: none` / no ucode)."""
    from forge.formats.image.layer_read import apply_layers
    from forge.formats.image.layout import read_image
    img = read_image(ctx.path(ctx.inputs[0]), ctx.params.get("platform", "linux/amd64"))
    root = ctx.path(".image")
    p = ctx.params
    binary, tar, ucode = p.get("binary", "kernel"), p.get("tar", "kernel.tar"), p.get("ucode", "ucode.cpio")
    names = [n.lstrip("/") for n in (binary, tar, ucode) if n]
    apply_layers([b for _, b in img.layers], root,
                        include=lambda rel: rel in names)
    if not (root / binary).is_file():
        raise ActionFailed(f"{ctx.inputs[0]} has no /{binary}: not an image in LinuxKit's kernel "
                           "layout (kernel, kernel.tar at the root)")
    mods: dict[str, tuple[str, dict, bytes]] = {}
    version = ""
    if tar and (root / tar).is_file():
        with tarfile.open(root / tar) as tf:
            for m in tf:
                if _take_module(tf, m, mods) and not version:
                    version = m.name.split("/modules/", 1)[1].split("/", 1)[0]
    _write_kernel(ctx, (root / binary).read_bytes(), version, mods)
    if ucode and (root / ucode).is_file():
        (ctx.path(ctx.outputs[0]) / "ucode.cpio").write_bytes((root / ucode).read_bytes())


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(resolve_deb, resolve_kernel, deb_package, deb_fetch, kernel, kernel_from_file,
                 kernel_from_deb, kernel_from_image)
