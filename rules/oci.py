"""Container image rules: oci_pull, oci_archive, oci_push and container_image.

Every image is an OCI image layout (a directory output) in forge's cache, so later
actions, and other machines through a shared cache, use it without a Docker engine.
`container_image` plans one action per Dockerfile stage (see rules/stages.py).
"""

from __future__ import annotations

import posixpath
import re

from forge.api import OUT_PREFIX, ActionFailed, AnalysisError, ExecContext, Location, \
    RunContext, action_function, attr, pin_resolver, pool, rule, runner
from forge.formats.dockerfile.errors import DockerfileError
from forge.formats.image.archive import import_archive
from forge.formats.image.errors import ImageError, LayoutError
from forge.formats.image.layout import verify_layout
from forge.formats.dockerfile.parser import context_sources, needed_stages, parse
from forge.formats.dockerfile.ignore import DockerIgnore
from forge.formats.image.errors import InvalidReferenceError
from forge.formats.image.reference import Reference
from forge.formats.image.spec import host_arch

from . import arch as archs
from . import compressors, sbom, stages

# Independent RUN stages build side by side; more would only fight for cores.
DOCKER_POOL = pool("docker", 2)
REGISTRY_POOL = pool("registry", 2)

PLATFORM_DOC = "Platform to select from a multi-platform index, e.g. linux/arm64."


def image_info(ctx, layout, tag: str | None = None, **extra):
    """`tag`: the image's own name (a LinuxKit package's), which `forge load` and
    oci_push use when given none."""
    load = {"layout": layout.path, **({"tag": tag} if tag else {})}
    return ctx.info(files=[layout], image=layout.path, **({"tag": tag} if tag else {}),
                    load={"runner": "DockerLoad", "params": load},
                    run={"runner": "DockerRun", "params": {"layout": layout.path}}, **extra)


def registry_client(config: dict):
    from forge.formats.registry.client import RegistryClient
    regs = config.get("registries", {})
    return RegistryClient(insecure=regs.get("insecure", []), mirrors=regs.get("mirrors", {}),
                          ca_bundle=regs.get("ca_cert"))


@pin_resolver("oci", placeholder="sha256:" + "0" * 64)
def resolve_tag(ref: str, config: dict) -> str:
    from forge.formats.registry.errors import RegistryError
    try:
        return str(registry_client(config).resolve(ref).digest)
    except (RegistryError, OSError) as e:
        raise AnalysisError(f"cannot resolve {ref}: {e}",
                            hint="check the reference, the registry, or use --offline with a "
                            "forge.lock that pins it") from None


def pinned(ctx, text: str, attr_name: str | None = None) -> Reference:
    """A registry reference with its digest: given, or from forge.lock."""
    try:
        ref = Reference.parse(text)
    except InvalidReferenceError as e:
        raise ctx.fail(str(e), attr=attr_name) from None
    if ref.digest:
        return ref
    return Reference.parse(f"{ref}@{ctx.pin('oci', str(ref))}")


def pull_action(ctx, ref: Reference, platform: str, name: str):
    out = ctx.declare_dir(name)
    ctx.call("OciPull", {"ref": str(ref), "platform": platform}, inputs=[], outputs=[out],
             mnemonic="OciPull", pool="registry", description=f"OciPull {ref}",
             origins=[(str(ref), f"oci://{ref}", ref.digest or "")])
    return out


# --- oci_pull ---------------------------------------------------------------------------

@rule("oci_pull", version=1, doc="""An image from a registry, pinned by digest: give `digest`,
or a tag that forge resolves once and records in forge.lock.""", attrs={
    "image": attr.string(mandatory=True, doc="Reference, e.g. registry.example.com/library/alpine:3.20."),
    "digest": attr.string(default="", doc="sha256:... of the manifest or index."),
    "platform": attr.string(default="linux/amd64", doc=PLATFORM_DOC),
})
def oci_pull(ctx):
    text = ctx.attr.image + (f"@{ctx.attr.digest}" if ctx.attr.digest else "")
    ref = pinned(ctx, text, "image")
    return image_info(ctx, pull_action(ctx, ref, ctx.attr.platform, ctx.label.name))


@action_function("OciPull", version=3)  # 3: keeps the image's attestation manifests
def oci_pull_step(ctx: ExecContext) -> None:
    from forge.formats.registry.errors import RegistryError
    if ctx.offline:
        raise ActionFailed(f"{ctx.params['ref']} is not in the cache and --offline forbids "
                           "pulling it", hint="build once online: the image is then cached")
    out = ctx.path(ctx.outputs[0])
    out.rmdir()  # the client writes the layout beside it and renames it into place
    try:
        registry_client(ctx.config).pull(ctx.params["ref"], out, platform=ctx.params["platform"],
                                         progress=ctx.progress)
    except (RegistryError, ImageError) as e:
        raise ActionFailed(str(e)) from None


# --- oci_archive --------------------------------------------------------------------------

@rule("oci_archive", version=1, doc="An image from a `docker save` tarball (either layout) or an "
      "OCI layout tarball.", attrs={
          "src": attr.label(mandatory=True, doc="The .tar file."),
      })
def oci_archive(ctx):
    srcs = ctx.files("src")
    if len(srcs) != 1:
        raise ctx.fail(f"src must be one file; got {len(srcs)}", attr="src")
    out = ctx.declare_dir(ctx.label.name)
    ctx.call("OciImport", {}, inputs=srcs, outputs=[out], mnemonic="OciImport")
    return image_info(ctx, out)


@action_function("OciImport", version=1)
def oci_import_step(ctx: ExecContext) -> None:
    try:
        import_archive(ctx.path(ctx.inputs[0]), ctx.path(ctx.outputs[0]))
        verify_layout(ctx.path(ctx.outputs[0]))
    except (LayoutError, OSError, ValueError) as e:
        raise ActionFailed(f"{ctx.inputs[0]} is not an image archive forge can read: {e}") from None


# --- several architectures -------------------------------------------------------------

@action_function("OciIndex", version=1)
def oci_index_step(ctx: ExecContext) -> None:
    from forge.formats.image.layout import merge_layouts
    try:
        merge_layouts(ctx.path(ctx.outputs[0]), [ctx.path(i) for i in ctx.inputs])
    except LayoutError as e:
        raise ActionFailed(str(e)) from None


# --- oci_push -----------------------------------------------------------------------------

@rule("oci_push", version=1, doc="Publishes an image to a registry: `forge run` this target.",
      attrs={
          "image": attr.label(mandatory=True, doc="The image target."),
          "repository": attr.string(default="", doc="e.g. registry.example.com/team/app; "
                                    "default: the image's own name (a linuxkit_package's "
                                    "<org>/<image>), else it must be given."),
          "tags": attr.string_list(default=[], doc="Tags to push; default: the image's own "
                                   "tag (a linuxkit_package's hash), else latest."),
      })
def oci_push(ctx):
    info = ctx.deps("image")[0]
    layout = info.extra.get("image")
    if layout is None:
        raise ctx.fail(f"{ctx.attr.image} is not an image target", attr="image")
    own_repo, _, own_tag = (info.extra.get("tag") or "").rpartition(":")
    repository = ctx.attr.repository or own_repo
    if not repository:
        raise ctx.fail("repository is mandatory for this image (it has no name of its own)",
                       attr="repository", hint='e.g. repository = "registry.example.com/team/app"')
    try:
        Reference.parse(repository)
    except InvalidReferenceError as e:
        raise ctx.fail(str(e), attr="repository") from None
    tags = list(ctx.attr.tags) or [own_tag or "latest"]
    return ctx.info(files=info.files, run={"runner": "OciPush", "params": {
        "layout": layout, "repository": repository, "tags": tags}})


@runner("OciPush")
def push_runner(ctx: RunContext) -> int:
    import os
    import sys
    from forge.formats.registry.errors import RegistryError
    client = registry_client(ctx.config)
    p = ctx.params
    tags = list(ctx.args) or p["tags"]
    attached: set[str] = set()
    for tag in tags:
        ref = f"{p['repository']}:{tag}"
        try:
            digest = client.push(ctx.root / p["layout"], ref)
            if digest not in attached:
                attached.add(digest)
                for name in attach_envelopes(client, ctx.root / p["layout"], ref, tag, digest):
                    print(f"forge: attached {os.path.relpath(name, ctx.root)} to {ref}",
                          file=sys.stderr)
        except (RegistryError, ImageError) as e:
            raise ActionFailed(f"push to {ref} failed: {e}") from None
        print(f"{ref}@{digest}")
    print(f"forge: pushed {len(tags)} tag(s)", file=sys.stderr)
    return 0


def attach_envelopes(client, layout, ref: str, tag: str, digest: str) -> list[str]:
    """Attach the signed statements near the layout whose subjects name the pushed digest,
    as OCI 1.1 referrers of the pushed manifest: the envelopes (*.dsse.json) in the layout's
    directory and each one above it in forge-out/, where a signed build writes the output's
    (LAYOUT.dsse.json, LAYOUT.*.dsse.json) and its targets' (NAME.provenance.dsse.json). The
    subject check is what picks them, so an envelope of something else is never attached."""
    from forge.formats.registry.push import pushed_document
    from forge.formats.registry.referrers import ENVELOPE_TYPE
    from forge.formats.sign import dsse
    from forge.formats.sign.attest import parse
    from forge.formats.sign.errors import SignError
    names = []
    body, media = pushed_document(layout, tag)
    subject = {"mediaType": media, "digest": digest, "size": len(body)}
    dirs = [layout.parent]
    while dirs[-1].parent.name and dirs[-1].name != OUT_PREFIX:
        dirs.append(dirs[-1].parent)
    for path in [p for d in dirs for p in sorted(d.glob("*.dsse.json"))]:
        data = path.read_bytes()
        try:  # the pusher's own file: read to pick the right ones, verified by `forge verify`
            st = parse(dsse.payload(dsse.decode(data, str(path))), str(path))
        except SignError:
            continue
        if not any(s["digest"].get("sha256") == digest.split(":", 1)[1] for s in st["subject"]):
            continue
        client.attach(ref, subject, ENVELOPE_TYPE, [(ENVELOPE_TYPE, data, {})],
                      {"in-toto.io/predicate-type": str(st.get("predicateType", ""))})
        names.append(str(path))
    return names


# --- container_image ----------------------------------------------------------------------

@rule("container_image", version=2, doc="""An image built from a Dockerfile. Each stage the
target needs is its own cached action, keyed on its parent image's digest, its instructions
after build-arg substitution and the digests of exactly the context files it copies.
Stages without RUN are assembled in Python with no Docker engine; stages with RUN run on
the engine. `NAME.sbom.spdx.json`, its SBOM, lists the packages of its bases it holds files
of (docs/supply-chain.md).""", attrs={
    "dockerfile": attr.label(default="Dockerfile", doc="The Dockerfile (a source file)."),
    "srcs": attr.label_list(doc="The build context: files COPY and ADD may read, at their "
                            "paths relative to this package."),
    "bases": attr.label_dict(doc='Image targets for FROM/COPY --from names, e.g. '
                             '{"debian": ":bookworm"}.'),
    "build_args": attr.string_dict(doc="Values for ARG."),
    "target": attr.string(default="", doc="The stage to build (default: the last)."),
    **archs.attrs(),
})
def container_image(ctx):
    arches = archs.arches_of(ctx)
    df_files = ctx.files("dockerfile")
    if len(df_files) != 1 or not df_files[0].source:
        raise ctx.fail("dockerfile must name one source file", attr="dockerfile")
    prefix = f"{ctx.package}/" if ctx.package else ""
    context = {a.path[len(prefix):]: a for a in ctx.files("srcs") if a.source
               and a.path.startswith(prefix)}
    ignore_art = ctx.optional_source(".dockerignore")
    if ignore_art is not None:
        ignore = DockerIgnore(ctx.read_source(ignore_art))
        context = {k: v for k, v in context.items() if not ignore.matches(k)}
    text = ctx.read_source(df_files[0])
    roots: dict[str, list] = {a: [] for a in arches}
    layouts = {a: plan_dockerfile(ctx, df_files[0].path, text, context, bases=dict(ctx.attr.bases),
                                  build_args=dict(ctx.attr.build_args), target=ctx.attr.target,
                                  arch=a, primary=arches[0], prefix=prefix, roots=roots[a])
               for a in arches}
    bases = [ctx.dep(label) for label in ctx.attr.bases.values()]
    inventories = {a: sbom.inherited(ctx, bases, a) for a in arches}
    sboms = {a: sbom.image_sbom(ctx, layouts[a], a, archs.out_name(ctx.label.name, a, arches[0]),
                                inventories[a], archs.platform(a), attested=roots[a])
             for a in arches}
    return archs.image_info(ctx, layouts, more_files=[*sboms.values(), *map(sbom.cdx_of, sboms.values())],
                            inventory=inventories,
                            sbom={a: s.path for a, s in sboms.items()})


def plan_dockerfile(ctx, df_path: str, df_text: str, context: dict, *, bases: dict,
                    build_args: dict, target: str, arch: str, primary: str, prefix: str,
                    network: str | None = None, roots: list | None = None):
    """The stage actions of a Dockerfile for one architecture; returns the final stage's
    layout artifact. `context` maps build-context paths to source artifacts (normally
    `prefix` + the path; any other is passed to the steps as `sources`); `bases` maps FROM
    names to image labels; `network` is the RUN stages' network mode (None: the engine's
    default). `roots` receives the layout of the image the final stage's FROM chain starts
    from (none for scratch): all of it is in the result, so its attested SBOMs are too."""
    platform = archs.platform(arch)
    try:
        df = parse(df_text, df_path)
        resolved = df.resolve(build_args, predefined=_target_args(platform))
        wanted = needed_stages(resolved, target or None)
    except DockerfileError as e:
        raise AnalysisError(e.message if hasattr(e, "message") else str(e).split(": ", 1)[-1],
                            location=Location(df_path, getattr(e, "line", 0), getattr(e, "col", 0)))
    moved = {rel: a.path for rel, a in context.items() if a.path != prefix + rel}
    base_arts = {name: archs.image_for(ctx, ctx.dep(label), arch, f"bases['{name}'] ({label})", "bases")
                 for name, label in bases.items()}
    stem = archs.out_name(ctx.label.name, arch, primary)
    layouts: dict[int, object] = {}
    root_of: dict[int, object] = {}
    pulled: dict[str, object] = {}

    def image_input(ref_text: str, ins_line: int):
        """The layout artifact for an external image name: a `bases` entry, or a pull."""
        for key in (ref_text, ref_text.split("@")[0], ref_text.rsplit(":", 1)[0]):
            if key in bases:
                if base_arts[key] is None:
                    raise ctx.fail(f"bases['{key}'] is not an image target", attr="bases")
                return base_arts[key]
        if ref_text not in pulled:
            try:
                ref = pinned(ctx, ref_text)
            except AnalysisError as e:
                raise AnalysisError(e.message, location=Location(df_path, ins_line, 1),
                                    hint=f"or map it to an image target: bases = {{\"{ref_text}\": "
                                    "\":my_image\"}") from None
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", ref_text)
            pulled[ref_text] = pull_action(ctx, ref, platform, f"{stem}.bases/{safe}")
        return pulled[ref_text]

    for idx in wanted:
        st = resolved.stages[idx]
        inputs = []
        base = {"kind": st.base.kind, "path": None}
        if st.base.kind == "stage":
            base["path"] = layouts[st.base.stage].path
            inputs.append(layouts[st.base.stage])
            root_of[idx] = root_of.get(st.base.stage)
        elif st.base.kind == "image":
            art = image_input(st.base.ref, st.line)
            base["path"] = art.path
            inputs.append(art)
            root_of[idx] = art
        from_map = {}
        for step in st.steps:
            ins = step.instruction
            frm = ins.flags.get("from") if ins.cmd in ("COPY", "ADD") else None
            if frm is None:
                continue
            dep = _stage_ref(resolved, frm)
            art = layouts[dep] if dep is not None else image_input(frm, ins.line)
            from_map[frm] = art.path
            inputs.append(art)
        copies = {}
        for ins, patterns in context_sources(st):
            files = _match_context(context, patterns)
            if not files:
                raise AnalysisError(f"{ins.cmd} {' '.join(patterns)}: no file of the build context "
                                    "matches", location=Location(df_path, ins.line, ins.col),
                                    hint="add the files to srcs (e.g. srcs = glob([\"**\"]))")
            copies[str(ins.line)] = files
            inputs.extend(context[f] for f in files)
        has_run = any(s.instruction.cmd == "RUN" for s in st.steps)
        name = st.name or str(idx)
        out = ctx.declare_dir(f"{stem}.stages/{name}")
        params = {"dockerfile": df_path, "stage": name, "base": base, "from": from_map,
                  "context_prefix": prefix, "copies": copies, "platform": platform,
                  "args": {k: v for k, v in st.used_args.items() if v is not None},
                  "steps": [stages.step_params(s) for s in st.steps]}
        used = {f: moved[f] for fs in copies.values() for f in fs if f in moved}
        if used:  # context files from elsewhere (a LinuxKit package's extra sources)
            params["sources"] = used
        if has_run:  # the engine's layers are normalised and compressed here
            params["compressor"] = compressors.param("gzip")
            if network is not None:
                params["network"] = network
        else:
            params["layers"] = {}
            for n, step in enumerate(st.steps):
                if step.instruction.cmd not in ("COPY", "ADD"):
                    continue
                layer = _copy_action(ctx, st, n, params, inputs, f"{stem}.stages/{name}")
                params["layers"][str(n)] = layer.path
                inputs.append(layer)
            inputs = [i for i in inputs if i.path == base["path"] or i.path in
                      params["layers"].values()]
        foreign = has_run and arch != host_arch()
        if foreign:
            emulator, problem = stages.emulator(arch)
            if problem:
                raise ctx.fail(f"stage {name} RUNs commands for {arch}, and {problem}",
                               attr="arches" if getattr(ctx.attr, "arches", None) else "arch",
                               hint=stages.EMULATION_HINT)
            params["emulator"] = emulator
        ctx.call("DockerStage" if has_run else "AssembleStage", params,
                 inputs=list(dict.fromkeys(inputs)), outputs=[out],
                 mnemonic="DockerStage" if has_run else "AssembleStage",
                 pool="docker" if has_run else None,
                 # the emulator runs the stage's commands: a new one is a new result
                 tools=[emulator] if foreign else [],
                 description=f"{'DockerStage' if has_run else 'AssembleStage'} {ctx.label} "
                             f"[{name}]" + (f" ({arch})" if arch != primary else ""))
        layouts[idx] = out
    if roots is not None and root_of.get(wanted[-1]) is not None:
        roots.append(root_of[wanted[-1]])
    return layouts[wanted[-1]]


def _target_args(platform: str) -> dict:
    """BuildKit's automatic platform ARGs (TARGETARCH...), for the platform being built."""
    from forge.formats.image.spec import parse_platform
    os_, arch, variant = parse_platform(platform)
    hos, harch = "linux", host_arch()
    return {"TARGETPLATFORM": platform, "TARGETOS": os_, "TARGETARCH": arch,
            "TARGETVARIANT": variant or "", "BUILDPLATFORM": f"{hos}/{harch}", "BUILDOS": hos,
            "BUILDARCH": harch, "BUILDVARIANT": ""}


def _copy_action(ctx, st, n: int, stage_params: dict, stage_inputs: list, where: str):
    """A CopyLayer action for step `n` of a stage without RUN; its inputs are exactly
    what that instruction reads."""
    step = st.steps[n]
    ins = step.instruction
    dest = ins.args[-1] if ins.args else "/"
    relative = not dest.startswith("/")
    base = stage_params["base"] if relative else {"kind": "none", "path": None}
    frm = ins.flags.get("from")
    files = stage_params["copies"].get(str(ins.line), [])
    moved = stage_params.get("sources", {})
    wanted = {moved.get(f) or stage_params["context_prefix"] + f for f in files}
    if frm is not None:
        wanted.add(stage_params["from"][frm])
    if base["path"]:
        wanted.add(base["path"])
    inputs = [i for i in stage_inputs if i.path in wanted]
    params = {k: stage_params[k] for k in ("dockerfile", "context_prefix", "platform")}
    params.update({"step": stages.step_params(step), "base": base,
                   "compressor": compressors.param("gzip"),
                   "copies": {str(ins.line): files},
                   **({"sources": {f: stage_params["sources"][f] for f in files
                                   if f in stage_params["sources"]}}
                      if stage_params.get("sources") else {}),
                   "from": {frm: stage_params["from"][frm]} if frm is not None else {},
                   "workdirs": [s.instruction.args[0] for s in st.steps[:n]
                                if s.instruction.cmd == "WORKDIR"] if relative else []})
    out = ctx.declare_dir(f"{where}.layers/{n}")
    ctx.call("CopyLayer", params, inputs=inputs, outputs=[out], mnemonic="CopyLayer",
             description=f"CopyLayer {ctx.label} [{stage_params['stage']}] "
                         f"{ins.cmd} line {ins.line}")
    return out


def _stage_ref(resolved, text: str) -> int | None:
    for st in resolved.stages:
        if st.name == text or str(st.index) == text:
            return st.index
    return None


def _match_context(context: dict, patterns: list[str]) -> list[str]:
    """Context files a COPY source names: a file, a directory's contents, or a glob
    (Go's filepath.Match, as Docker: `*` and `?` stop at `/`) over files or directories."""
    out = set()
    for pat in patterns:
        p = posixpath.normpath(pat.lstrip("/"))
        p = "" if p == "." else p
        rx = re.compile("".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
                                for c in p) + r"\Z")
        for f in context:
            parts = f.split("/")
            if not p or any(rx.match("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
                out.add(f)
    return sorted(out)


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(DOCKER_POOL, REGISTRY_POOL, resolve_tag, oci_pull, oci_pull_step, oci_archive,
                 oci_index_step,
                 oci_import_step, oci_push, push_runner, container_image)
