"""Debian rules: `debian_rootfs` (mmdebstrap into a single-layer OCI image)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from forge.api import ActionFailed, Artifact, ExecContext, action_function, attr, pool, rule
from forge.formats.debian import errors as debian_errors
from forge.formats.debian import keyring as debian_keyring
from forge.formats.image.layer_write import normalise
from forge.formats.image.layout import add_blob, image_config_defaults, write_image

from forge.formats.image.spec import DEBIAN_TO_OCI, host_arch

from . import arch as archs
from . import compressors, debtrust, sbom, stages
from .debtrust import mirror_for

# Downloads overlap the other run's unpacking; more would only fight for 2 cores.
MMDEBSTRAP_POOL = pool("mmdebstrap", 2)

VARIANTS = ("extract", "custom", "essential", "apt", "required", "minbase", "buildd",
            "important", "standard")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.\-]*(:[a-z0-9]+)?(=[A-Za-z0-9.+~:\-]+)?$")


@rule("debian_rootfs", version=2, doc="""A Debian root filesystem made by mmdebstrap, as a
single-layer OCI image whose bytes are reproducible (sorted entries, every time set to
SOURCE_DATE_EPOCH). The mirror is `[debian] mirror` in forge.toml, else the Debian archive
this machine's apt sources name; it is not part of the key (pin versions, or change the
workspace salt, to force a rebuild when the archive moves). apt, run by mmdebstrap,
verifies the suite's signature as it always does: with `keyring` (or `[debian] keyring`)
if one is named, else with this machine's apt keyrings; the trusted keys are part of the
key. Beside the image: `NAME.debs.json` (the packages apt installed), `NAME.origins.json`
(where from) and `NAME.sbom.spdx.json` (docs/supply-chain.md).""", attrs={
    "suite": attr.string(mandatory=True, doc="Debian suite, e.g. bookworm."),
    "variant": attr.string(default="minbase", values=VARIANTS, doc="mmdebstrap's --variant."),
    "packages": attr.string_list(doc="Extra packages; `name=version` pins a version."),
    "components": attr.string_list(default=["main"], doc="Archive components."),
    **archs.attrs(),
    "cmd": attr.string_list(default=["bash"], doc="The image's default command."),
    "keyring": attr.string(default="", doc="The keyring apt must verify the suite with (mmdebstrap "
                           "--keyring): an absolute path, or a label of a file of the workspace; "
                           "default: [debian] keyring in forge.toml, else this machine's apt "
                           "keyrings (docs/trust.md)."),
})
def debian_rootfs(ctx):
    for p in ctx.attr.packages:
        if not _PACKAGE.match(p):
            raise ctx.fail(f"'{p}' is not a Debian package name (optionally name=version)",
                           attr="packages")
    arches = archs.arches_of(ctx)
    trust = debtrust.trust_for(ctx, ctx.attr.suite, for_apt=True)
    base = {"suite": ctx.attr.suite, "variant": ctx.attr.variant,
            "packages": sorted(set(ctx.attr.packages)), "components": list(ctx.attr.components),
            "cmd": list(ctx.attr.cmd), "compressor": compressors.param("gzip"), **trust.params()}
    inputs = []
    if trust.host_keyring:
        base["keyring"] = trust.host_keyring
    elif trust.workspace_keyring:
        inputs = [ctx.source_file(trust.workspace_keyring)]
        base["keyring"] = inputs[0].path
    layouts, inventories, sboms = {}, {}, {}
    for arch in arches:
        stem = archs.out_name(ctx.label.name, arch, arches[0])
        out = ctx.declare_dir(stem)
        debs = ctx.declare(stem + ".debs.json")  # what apt installed: the SBOM's packages
        origins = ctx.declare(stem + ".origins.json")  # and where from: the provenance's
        tools = ["mmdebstrap"]
        if arch != host_arch() and ctx.attr.variant != "extract":
            # maintainer scripts run under qemu-user: the emulator is part of the result
            emulator, problem = stages.emulator(arch)
            if problem:
                raise ctx.fail(f"mmdebstrap runs {arch} maintainer scripts, and {problem}",
                               attr="arches" if ctx.attr.arches else "arch",
                               hint=stages.EMULATION_HINT + "; or use variant = \"extract\", "
                               "which unpacks packages and runs none of their scripts")
            tools += ["arch-test", emulator]
        ctx.call("Mmdebstrap", {**base, "architecture": arch}, inputs=inputs, outputs=[out, debs, origins],
                 origins_file=origins,
                 mnemonic="DebianRootfs", pool="mmdebstrap", tools=tools,
                 description=f"DebianRootfs {ctx.label} ({ctx.attr.suite}, {arch})")
        layouts[arch] = out
        inventories[arch] = [debs.path]
        sboms[arch] = sbom.image_sbom(ctx, out, arch, stem, [debs.path], archs.platform(arch))
    return archs.image_info(ctx, layouts, more_files=[*sboms.values(), *map(sbom.cdx_of, sboms.values()),
                                                      *(Artifact(p, source=False) for v in inventories.values() for p in v)],
                            inventory=inventories, sbom={a: s.path for a, s in sboms.items()})


ARCH_TO_OCI = DEBIAN_TO_OCI


def _readable_keyring(path) -> str:
    """A binary copy of the keyring that apt can read: its gpgv runs as the unprivileged
    _apt user, who cannot enter forge's sandbox or a private home, and an armoured file
    outside trusted.gpg.d is not recognised. Public keys: readable by all is fine."""
    try:
        keys = debian_keyring.load([Path(path)])
    except debian_errors.KeyringError as e:
        raise ActionFailed(str(e)) from None
    d = tempfile.mkdtemp(prefix="forge-keyring-")
    os.chmod(d, 0o755)
    Path(d, "keyring.gpg").write_bytes(keys)
    os.chmod(Path(d, "keyring.gpg"), 0o644)
    return d


def _own_namespaces(argv: list[str]) -> list[str]:
    """As root, mmdebstrap mounts /proc, /sys and /dev into the tree it builds, in the
    host's mount table: a forge killed mid-run would leave them there. In a mount and pid
    namespace of its own they go when it goes, and so does every process it started."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return argv  # unprivileged, mmdebstrap runs in user namespaces of its own already
    return ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
            "--mount-proc", *argv]


@action_function("Mmdebstrap", version=5)  # 5: N.debs.json, what apt installed
def run_mmdebstrap(ctx: ExecContext) -> None:
    p = ctx.params
    compressors.check(ctx, "gzip")
    if ctx.offline:
        raise ActionFailed("debian_rootfs needs the Debian mirror and --offline forbids it",
                           hint="build once online: the result is cached")
    raw = ctx.path("rootfs.tar")
    argv = ["mmdebstrap", f"--variant={p['variant']}", f"--architectures={p['architecture']}",
            f"--components={','.join(p['components'])}", "--format=tar"]
    if p["packages"]:
        argv.append(f"--include={','.join(p['packages'])}")
    # apt verifies the suite itself; forge never turns that off (no trusted=yes, no
    # AllowInsecureRepositories), it only says which keyring when one is named.
    keyring_dir = None
    if p.get("keyring"):
        keyring_dir = _readable_keyring(p["keyring"] if p["keyring"].startswith("/")
                                        else ctx.path(p["keyring"]))
        argv.append(f"--keyring={keyring_dir}/keyring.gpg")
    # apt creates its `partial` directories owned by _apt or by root depending on which
    # of its runs got there first; settle it as Debian's own images have it.
    argv.append("--customize-hook=chroot \"$1\" sh -c 'for d in /var/cache/apt/archives/partial "
                "/var/lib/apt/lists/partial; do if [ -d $d ]; then chown _apt:root $d; "
                "chmod 700 $d; fi; done'")
    # The .deb files apt installed, kept for the inventory (the SBOM's packages): those
    # extracted first (the only ones of the extract variant, which runs no customize
    # hook) and those installed after; the cleanup phase still empties apt's cache in
    # the tree itself.
    debs_dir = ctx.path("debs").resolve()
    debs_dir.mkdir()
    lists_dir = ctx.path("lists").resolve()
    lists_dir.mkdir()
    argv += ["--skip=essential/unlink",
             f"--extract-hook=sync-out /var/lib/apt/lists {lists_dir}",
             f"--extract-hook=sync-out /var/cache/apt/archives {debs_dir}",
             f"--customize-hook=sync-out /var/cache/apt/archives {debs_dir}"]
    argv += [p["suite"], str(raw), mirror_for(ctx.config)]
    try:
        ctx.run(_own_namespaces(argv))
    finally:
        if keyring_dir is not None:
            shutil.rmtree(keyring_dir, ignore_errors=True)
    out = ctx.path(ctx.outputs[0])
    epoch = ctx.source_date_epoch
    layer_tmp = ctx.path("layer.tar.gz")
    with open(raw, "rb") as src, open(layer_tmp, "wb") as dst:
        info = normalise(src, dst, mtime=epoch, compress=True)
    raw.unlink()
    add_blob(out, layer_tmp, info.media_type)
    arch = ARCH_TO_OCI.get(p["architecture"], p["architecture"])
    config = image_config_defaults(
        diff_ids=[info.diff_id], platform=f"linux/{arch}", cmd=p["cmd"],
        env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    write_image(out, config, [info], platform=("linux", arch))
    packages = _write_inventory(ctx, debs_dir, ctx.path(ctx.outputs[1]))
    _write_origins(ctx, packages, lists_dir, ctx.path(ctx.outputs[2]))


def _write_inventory(ctx: ExecContext, debs_dir: Path, dest: Path) -> list[dict]:
    from forge.formats.common.files import canonical_json
    from forge.formats.debian.errors import DebError
    from forge.formats.debian.inventory import inventory
    try:
        packages = inventory(sorted(debs_dir.glob("*.deb")))
    except DebError as e:
        raise ActionFailed(f"a package apt installed cannot be read: {e}") from None
    p = ctx.params
    dest.write_bytes(canonical_json({"distro": "debian", "suite": p["suite"],
                                     "components": p["components"], "architecture": p["architecture"],
                                     "packages": packages}))
    shutil.rmtree(debs_dir, ignore_errors=True)
    return packages


def _write_origins(ctx: ExecContext, packages: list[dict], lists_dir: Path, dest: Path) -> None:
    """Where the packages and the indexes apt verified them by came from (the mirror of
    this build: a file of its own, so the inventory stays the same from any mirror). apt
    keeps an index decompressed, as the Release it verified lists it too."""
    import hashlib
    from forge.formats.common.files import canonical_json
    from forge.formats.debian.inventory import pool_path
    p = ctx.params
    mirror = mirror_for(ctx.config).rstrip("/")
    comps = p["components"]
    out = []
    for rec in packages:
        out.append({"name": f"{rec['package']}_{rec['version']}_{rec['architecture']}.deb",
                    "uri": f"{mirror}/{pool_path(rec, comps[0] if comps else 'main')}",
                    "digest": {"sha256": rec["sha256"]}})
    suite = p["suite"]
    wanted = {f"_dists_{suite}_InRelease": f"dists/{suite}/InRelease",
              f"_dists_{suite}_Release": f"dists/{suite}/Release"}
    for c in comps:
        wanted[f"_dists_{suite}_{c}_binary-{p['architecture']}_Packages"] = \
            f"dists/{suite}/{c}/binary-{p['architecture']}/Packages"
    for f in sorted(lists_dir.iterdir()):
        rel = next((v for k, v in wanted.items() if f.name.endswith(k)), None)
        if rel and f.is_file():
            out.append({"name": rel, "uri": f"{mirror}/{rel}",
                        "digest": {"sha256": hashlib.sha256(f.read_bytes()).hexdigest()}})
    shutil.rmtree(lists_dir, ignore_errors=True)
    dest.write_bytes(canonical_json({"origins": out}))


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(MMDEBSTRAP_POOL, debian_rootfs, run_mmdebstrap)
