"""Target architectures: the `arch` / `arches` attributes of image rules, and how a
consumer takes one architecture's image from a target that may build several.

An image target's info carries `image` (its OCI layout: one manifest, or with several
arches an index with one manifest per platform) and `images` ({arch: a layout with that
arch's manifest only}), so a consumer's action depends only on the architecture it uses.
"""

from __future__ import annotations

from forge.api import attr
from forge.formats.image.spec import DEBIAN_TO_OCI, host_arch

ARCH_DOC = ("Architecture to build for, by Debian's name (amd64, arm64); default: this "
            "machine's.")
ARCHES_DOC = ("Several architectures to build for, one cached action each; the image is "
              "then an OCI index with one manifest per platform (see docs/images.md).")


def attrs(multi: bool = True) -> dict:
    out = {"arch": attr.string(default="", doc=ARCH_DOC)}
    if multi:
        out["arches"] = attr.string_list(doc=ARCHES_DOC)
    return out


def _check(ctx, arch: str, attr_name: str) -> str:
    if arch not in DEBIAN_TO_OCI:
        raise ctx.fail(f"unknown architecture '{arch}'", attr=attr_name,
                       hint=f"use one of: {', '.join(DEBIAN_TO_OCI)}")
    return arch


def arch_of(ctx) -> str:
    """The single architecture of a target with only `arch`."""
    return _check(ctx, ctx.attr.arch, "arch") if ctx.attr.arch else host_arch()


def arches_of(ctx) -> list[str]:
    """The architectures a target builds, the primary one first: the host's when it is
    among them, whose outputs keep the names (and keys) of a host-only build."""
    many = list(getattr(ctx.attr, "arches", None) or [])
    if many and ctx.attr.arch:
        raise ctx.fail("give either arch or arches, not both", attr="arches")
    if not many:
        return [arch_of(ctx)]
    if len(set(many)) != len(many):
        raise ctx.fail("arches lists an architecture twice", attr="arches")
    for a in many:
        _check(ctx, a, "arches")
    host = host_arch()
    return ([host] if host in many else []) + [a for a in many if a != host]


def platform(arch: str) -> str:
    return f"linux/{DEBIAN_TO_OCI.get(arch, arch)}"


def out_name(name: str, arch: str, primary: str) -> str:
    """The output name for one architecture: the primary keeps the plain name."""
    return name if arch == primary else f"{name}.{arch}"


def image_for(ctx, info, arch: str, what: str, attr_name: str | None = None, location=None):
    """The layout artifact of `info` (an image target's) for `arch`, or None when the
    target is not an image. A target built for other arches only is an analysis error."""
    from forge.api import AnalysisError
    images = info.extra.get("images")
    if images is None:  # pulled or imported: the platform is chosen when it is read
        path = info.extra.get("image")
    elif arch in images:
        path = images[arch]
    else:
        message = f"{what} is not built for {arch} (it builds {', '.join(images)})"
        hint = f"add \"{arch}\" to its arches"
        if location is not None or attr_name is None:
            raise AnalysisError(message, location=location, hint=hint)
        raise ctx.fail(message, attr=attr_name, hint=hint)
    if path is None:
        return None
    return next(a for a in info.files if a.path == path)


def index_action(ctx, layouts: dict, name: str):
    """One layout whose index lists every arch's manifest (blobs linked, not copied)."""
    out = ctx.declare_dir(f"{name}.index")
    ctx.call("OciIndex", {"arches": list(layouts)}, inputs=list(layouts.values()),
             outputs=[out], mnemonic="OciIndex", description=f"OciIndex {ctx.label}")
    return out


def image_info(ctx, layouts: dict, tag: str | None = None, more_files=(), **extra):
    """The info of an image target that built `layouts` ({arch: layout}, primary first);
    `tag`: its own name (a LinuxKit package's), which forge load and oci_push default to;
    `more_files`: its other outputs (SBOMs)."""
    arches = list(layouts)
    primary = layouts[arches[0]]
    image = primary if len(layouts) == 1 else index_action(ctx, layouts, ctx.label.name)
    local = layouts.get(host_arch(), primary)  # what a Docker engine here loads and runs
    files = [image] + [v for v in layouts.values() if v is not image] + list(more_files)
    return ctx.info(files=files, image=image.path,
                    images={a: v.path for a, v in layouts.items()}, arch=arches[0],
                    load={"runner": "DockerLoad", "params": {"layout": local.path,
                                                             **({"tag": tag} if tag else {})}},
                    run={"runner": "DockerRun", "params": {"layout": local.path}},
                    **({"tag": tag} if tag else {}), **extra)
