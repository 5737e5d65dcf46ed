"""SBOMs of the images forge builds: `N.sbom.spdx.json` (SPDX 2.3) beside every
debian_rootfs, container_image and linuxkit_image output, written from forge's own
graph (docs/supply-chain.md):

- debian_rootfs records the .deb files apt installed (`N.debs.json`, an inventory:
  forge.formats.debian.inventory); its image contains every one of them.
- an image built on others inherits their inventories (`inventory` in its info): it
  contains a package when it holds one of the package's files, so a stage that copies
  redis-server and its libraries out of a Debian tree contains redis-server and libc6,
  not the shell the copying ran in; the SPDX attestations of the image its FROM chain
  starts from (a pulled image's) are merged.
- a linuxkit_image merges the SBOM of each image it uses (or, for a pulled image, the
  SPDX attestations its layout carries), the kernel package and the modules kept, and the
  files of `files:`; the document is also at the root of the image, as LinuxKit puts it.
"""

from __future__ import annotations

import json
import tarfile

from forge.api import FORGE_VERSION, ActionFailed, Artifact, ExecContext, action_function
from forge.formats.common.files import atomic_write
from forge.formats.image.errors import LayoutError
from forge.formats.image.layout import read_image
from forge.formats.image.layer_read import open_random
from forge.formats.sbom import attestations, cyclonedx
from forge.formats.sbom.spdx import Document, created, dumps, spdx_id

SUFFIX = ".sbom.spdx.json"
CDX_SUFFIX = ".cdx.json"  # the same SBOM in CycloneDX 1.6
DISTRO = "debian"


def creators() -> list[str]:
    return [f"Tool: forge-{FORGE_VERSION}", "Organization: forge"]


def _paths(info, key: str, arch: str) -> list[str]:
    return list((info.extra.get(key) or {}).get(arch, []))


def inherited(ctx, infos: list, arch: str) -> list[str]:
    """The inventories of the image targets `infos` for `arch` (base images, COPY --from)."""
    out: list[str] = []
    for info in infos:
        out += [p for p in _paths(info, "inventory", arch) if p not in out]
    return out


def cdx_of(sbom: Artifact) -> Artifact:
    """The CycloneDX twin of an SBOM output."""
    return Artifact(sbom.path[:-len(SUFFIX)] + CDX_SUFFIX, source=False)


def image_sbom(ctx, layout: Artifact, arch: str, stem: str, inventories: list[str],
               platform: str, attested: list[Artifact] = ()) -> Artifact:
    """Plan the SBOM of one architecture's image `layout`; `attested`: layouts of images
    it wholly contains (its FROM base) whose attested SBOMs are merged (a pulled image's)."""
    out = ctx.declare(stem + SUFFIX)
    params = {"name": str(ctx.label), "platform": platform, "inventories": list(inventories)}
    if attested:  # absent otherwise: the actions of images without such bases keep their keys
        params["attested"] = [a.path for a in attested]
    ctx.call("ImageSbom", params,
             inputs=[layout, *(Artifact(p, source=False) for p in inventories), *attested],
             outputs=[out, ctx.declare(stem + CDX_SUFFIX)],
             mnemonic="ImageSbom", description=f"ImageSbom {ctx.label} ({arch})")
    return out


def _norm(path: str) -> str:
    """Paths compared across merged-/usr trees: /lib/x.so and /usr/lib/x.so are one file."""
    p = path.lstrip("./").lstrip("/")
    head, _, rest = p.partition("/")
    if head in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        return f"usr/{head}/{rest}" if rest else f"usr/{head}"
    return p


def _image_files(img) -> set[str]:
    names: set[str] = set()
    keep: list = []
    for _, blob in img.layers:
        tf = open_random(blob, keep)
        for m in tf:
            base = m.name.rsplit("/", 1)[-1]
            if base.startswith(".wh."):
                continue
            if not m.isdir():
                names.add(_norm(m.name))
    for f in keep:
        try:
            f.close()
        except Exception:
            pass
    return names


@action_function("ImageSbom", version=1)
def image_sbom_step(ctx: ExecContext) -> None:
    p = ctx.params
    layout = ctx.path(ctx.inputs[0])
    try:
        img = read_image(layout, p["platform"])
        attested = attestations.spdx_documents(layout, img.manifest_digest)
        for base in p.get("attested", []):
            base_img = read_image(ctx.path(base), p["platform"])
            attested += attestations.spdx_documents(ctx.path(base), base_img.manifest_digest)
    except LayoutError as e:
        raise ActionFailed(f"{p['name']}: {e}") from None
    doc = Document(p["name"])
    root = doc.image(p["name"], img.manifest_digest)
    doc.describes.append(root)
    files = _image_files(img)
    for inv in p["inventories"]:
        for rec in json.loads(ctx.path(inv).read_text())["packages"]:
            if any(_norm(f) in files for f in rec["files"]):
                doc.relate(root, "CONTAINS", doc.deb(rec, DISTRO))
    for other in attested:
        doc.merge(other, root)
    _write(ctx, doc)


def _write(ctx: ExecContext, doc: Document) -> bytes:
    """Both formats: SPDX as outputs[0], CycloneDX as the last output."""
    spdx = doc.to_dict(created(ctx.source_date_epoch), creators())
    data = dumps(spdx)
    atomic_write(ctx.path(ctx.outputs[0]), data)
    atomic_write(ctx.path(ctx.outputs[-1]), dumps(cyclonedx.from_spdx(spdx, FORGE_VERSION)))
    return data


# --- linuxkit_image ---------------------------------------------------------------------

def os_sbom(ctx, name: str, images: dict, kernel_dir: Artifact | None, files_frag: Artifact | None,
            platform: str):
    """Plan the SBOM of a linuxkit_image: `images` maps each image text of the assembly to
    (its SBOM artifact, or None, its layout artifact). Returns (the document, a fragment
    holding it as /sbom.spdx.json)."""
    inputs, parts = [], []
    for text in sorted(images):
        sbom, layout = images[text]
        art = sbom or layout
        parts.append({"image": text, "path": art.path, "kind": "sbom" if sbom else "layout"})
        inputs.append(art)
    params = {"name": str(ctx.label), "platform": platform, "images": parts,
              "kernel": kernel_dir.path if kernel_dir else None,
              "files": files_frag.path if files_frag else None}
    inputs += [a for a in (kernel_dir, files_frag) if a is not None]
    out, frag = ctx.declare(name + SUFFIX), ctx.declare(f"{name}.rootfs/sbom.tar")
    ctx.call("LkSbom", params, inputs=inputs, outputs=[out, frag, ctx.declare(name + CDX_SUFFIX)],
             mnemonic="LkSbom",
             description=f"LkSbom {ctx.label}")
    return out, frag


def _kernel(doc: Document, kdir, root: str) -> None:
    pkg_file = kdir / "package.json"
    if not pkg_file.is_file():  # a kernel from an image or a bare file: no package record
        kid = doc.package(spdx_id("kernel", "kernel"), "kernel", purpose="OPERATING-SYSTEM")
    else:
        kid = doc.deb(json.loads(pkg_file.read_text()), DISTRO)
    doc.relate(root, "CONTAINS", kid)
    tar = kdir / "kernel.tar"
    if tar.is_file():
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.isfile() and m.name.endswith((".ko", ".ko.xz", ".ko.zst", ".ko.gz")):
                    fid = doc.file(m.name, tf.extractfile(m).read(), comment="kernel module kept")
                    doc.relate(kid, "CONTAINS", fid)


def _files(doc: Document, frag, root: str) -> None:
    with tarfile.open(frag) as tf:
        for m in tf:
            if m.isfile():
                doc.relate(root, "CONTAINS", doc.file(m.name, tf.extractfile(m).read(),
                                                      comment="from the assembly's files"))


@action_function("LkSbom", version=1)
def os_sbom_step(ctx: ExecContext) -> None:
    from forge.formats.linux.fragments import FragmentWriter
    p = ctx.params
    doc = Document(p["name"])
    root = doc.package(spdx_id("os", p["name"]), p["name"], purpose="OPERATING-SYSTEM",
                       comment="an OS image built by forge's linuxkit_image")
    doc.describes.append(root)
    for part in p["images"]:
        path = ctx.path(part["path"])
        if part["kind"] == "sbom":
            doc.merge(json.loads(path.read_text()), root)
            continue
        try:  # a pulled image: its digest, and the SBOMs attested in its layout
            img = read_image(path, p["platform"])
            attested = attestations.spdx_documents(path, img.manifest_digest)
        except LayoutError as e:
            raise ActionFailed(f"{part['image']}: {e}") from None
        iid = doc.image(part["image"], img.manifest_digest)
        doc.relate(root, "CONTAINS", iid)
        for other in attested:
            doc.merge(other, iid)
    if p["kernel"]:
        _kernel(doc, ctx.path(p["kernel"]), root)
    if p["files"]:
        _files(doc, ctx.path(p["files"]), root)
    data = _write(ctx, doc)
    with open(ctx.path(ctx.outputs[1]), "wb") as f, FragmentWriter(f, mtime=ctx.source_date_epoch) as w:
        w.file("sbom.spdx.json", data, 0o444)


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(image_sbom_step, os_sbom_step)
