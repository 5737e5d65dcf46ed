"""Debian rules: `debian_rootfs` (mmdebstrap into a single-layer OCI image)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from forge.api import ActionFailed, ExecContext, action_function, attr, pool, rule
from forge.formats.debian import errors as debian_errors
from forge.formats.debian import keyring as debian_keyring
from forge.formats.image.layer_write import normalise
from forge.formats.image.layout import add_blob, image_config_defaults, write_image

from forge.formats.image.spec import DEBIAN_TO_OCI, host_arch

from . import arch as archs
from . import compressors, debtrust, stages
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
key.""", attrs={
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
    layouts = {}
    for arch in arches:
        out = ctx.declare_dir(archs.out_name(ctx.label.name, arch, arches[0]))
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
        ctx.call("Mmdebstrap", {**base, "architecture": arch}, inputs=inputs, outputs=[out],
                 mnemonic="DebianRootfs", pool="mmdebstrap", tools=tools,
                 description=f"DebianRootfs {ctx.label} ({ctx.attr.suite}, {arch})")
        layouts[arch] = out
    return archs.image_info(ctx, layouts)


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


@action_function("Mmdebstrap", version=4)  # 4: the compressor in the key
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


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(MMDEBSTRAP_POOL, debian_rootfs, run_mmdebstrap)
