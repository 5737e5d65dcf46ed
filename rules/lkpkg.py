"""`linuxkit_package`: a LinuxKit package directory (build.yml + Dockerfile) built as
`linuxkit pkg build DIR` builds it, tagged `<org>/<image>:<hash>` as LinuxKit tags it.

The directory is read unchanged. Its Dockerfile is planned as container_image's is
(rules/oci.py `plan_dockerfile`: one cached action per stage, stages without RUN
assembled in Python, RUN stages on the engine, with no network unless build.yml says
`network: true`); the build context is the directory plus its `extra-sources` at their
`dst`. build.yml's `config` and `labels` are set by one more AssembleStage on top, so a
label change rebuilds no stage. The hash is computed while planning from the content
(forge.formats.linuxkit.package), so linuxkit_image can resolve a tag to the target.
"""

from __future__ import annotations

import json
import posixpath
import stat

from forge.api import AnalysisError, Location, attr, build_helper, rule
from forge.formats.dockerfile.ignore import DockerIgnore
from forge.formats.linuxkit import package as lkpkg
from forge.formats.linuxkit.errors import Loc

from . import arch as archs
from .oci import plan_dockerfile

_NOT_HASHED = {".git", "forge-out"}  # a nested repository; forge's own output link

LINUXKIT_PACKAGES = build_helper("linuxkit_packages", '''def linuxkit_packages(pattern = "*/build.yml", **kwargs):
    """One linuxkit_package per directory below this package whose build.yml matches
    `pattern`, named after the directory; returns their labels. Other keywords go to
    each, `packages` less the package itself (so one list serves all)."""
    labels = []
    for f in glob([pattern]):
        d = f[:-len("/build.yml")] if f.endswith("/build.yml") else "."
        name = d.split("/")[-1] if d != "." else package_name().split("/")[-1]
        kw = dict(kwargs)
        if "packages" in kw:
            kw["packages"] = [p for p in kw["packages"] if p not in (":" + name, name)]
        linuxkit_package(name = name, dir = d, **kw)
        labels.append(":" + name)
    return labels
''')


def _loc(where) -> Location | None:
    return Location(where.file, where.line, where.col) if isinstance(where, Loc) else None


def _error(e: lkpkg.PackageError) -> AnalysisError:
    return AnalysisError(e.message, location=_loc(e.where), hint=e.hint)


class _Tree:
    """The files below one directory of the workspace, read while planning."""

    def __init__(self, ctx, top: str):
        self.ctx, self.top = ctx, top
        self.entries: list[tuple[str, str, bytes]] = []  # (rel, git mode, content)
        self.files: list[str] = []                       # rel paths usable as build context
        st = ctx.lstat(top)
        if stat.S_ISDIR(st.st_mode):
            self._walk("")
        else:
            self._add("", st)

    def _walk(self, rel: str) -> None:
        here = posixpath.join(self.top, rel) if rel else self.top
        for name in sorted(self.ctx.list_dir(here)):
            if name in _NOT_HASHED:
                continue
            sub = f"{rel}/{name}" if rel else name
            st = self.ctx.lstat(posixpath.join(self.top, sub))
            if stat.S_ISDIR(st.st_mode):
                self._walk(sub)
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                self._add(sub, st)

    def _add(self, rel: str, st) -> None:
        path = posixpath.join(self.top, rel) if rel else self.top
        mode = lkpkg.git_mode(st.st_mode)
        if mode == lkpkg.SYMLINK:
            self.entries.append((rel, mode, self.ctx.readlink(path).encode()))
            try:
                self.ctx.source_file(path)  # a link to a file is copied as that file
                self.files.append(rel)
            except (FileNotFoundError, OSError):
                pass
        else:
            self.entries.append((rel, mode, self.ctx.read_file(path)))
            self.files.append(rel)

    @property
    def id(self) -> str:
        if len(self.entries) == 1 and self.entries[0][0] == "":
            return lkpkg.blob_id(self.entries[0][2])  # a single-file extra source
        return lkpkg.tree_id(self.entries)


def _inside(ctx, path: str, attr_name: str | None, where=None) -> str:
    p = posixpath.normpath(path)
    if p == ".." or p.startswith("../") or p.startswith("/"):
        msg = f"{path} is outside the workspace"
        hint = "forge keys every input by content: keep packages and their sources in the workspace"
        if where is not None:
            raise AnalysisError(msg, location=_loc(where), hint=hint)
        raise ctx.fail(msg, attr=attr_name, hint=hint)
    return "" if p == "." else p


def _arch(ctx, pkg: lkpkg.Package, yml: str) -> str:
    """The architecture to build (`arch`, else the host's); it must be in build.yml's
    arches. Another than the host's runs its RUN stages under qemu-user, as container_image."""
    arch = archs.arch_of(ctx)
    if arch not in pkg.arches:
        raise AnalysisError(f"package {pkg.image} is not built for {arch}: its arches are "
                            + ", ".join(pkg.arches), location=_loc(pkg.where("arches", yml)),
                            hint=f"add {arch} to arches, or set arch to one of them")
    return arch


@rule("linuxkit_package", version=1, doc="""A LinuxKit package: a directory with `build.yml`
and a Dockerfile, built as `linuxkit pkg build` builds it and tagged as LinuxKit tags it,
`<org>/<image>:<git tree hash of the directory>`. build.yml's image, org, tag, dockerfile,
arches, extra-sources, network, buildArgs, config (the org.mobyproject.config label) and
labels are honoured. Assemblies name it by label, or by its tag when linuxkit_image lists
it in `packages`. `forge load` and oci_push use the tag by default.""", attrs={
    "dir": attr.string(default=".", doc="The package directory, relative to this BUILD file."),
    "bases": attr.label_dict(doc='Image targets for FROM names, e.g. {"linuxkit/alpine": '
                             '"//base:alpine"} (as container_image\'s).'),
    "packages": attr.label_list(doc="linuxkit_package targets that FROM may name by their tag."),
    "build_args": attr.string_dict(doc="Build args over build.yml's buildArgs (as `linuxkit "
                                   "pkg build --build-arg`)."),
    **archs.attrs(multi=False),
})
def linuxkit_package(ctx):
    top = _inside(ctx, posixpath.join(ctx.package, ctx.attr.dir), "dir")
    yml = posixpath.join(top, lkpkg.BUILD_YML) if top else lkpkg.BUILD_YML
    try:
        text = ctx.read_file(yml).decode()
    except OSError:
        raise ctx.fail(f"{yml} does not exist", attr="dir",
                       hint="dir must name a LinuxKit package directory (build.yml, Dockerfile)") from None
    try:
        pkg = lkpkg.load(text, yml)
    except lkpkg.PackageError as e:
        raise _error(e) from None
    arch = _arch(ctx, pkg, yml)
    tree = _Tree(ctx, top or ".")
    prefix = f"{top}/" if top else ""
    context = {f: ctx.source_file(prefix + f) for f in tree.files}
    extra_ids = []
    for src in pkg.extra_sources:
        path = _inside(ctx, posixpath.join(top, src.src), None, src.loc) or "."
        try:
            sub = _Tree(ctx, path)
        except FileNotFoundError:
            raise AnalysisError(f"extra source {src.src} ({path}) does not exist",
                                location=_loc(src.loc), hint="src is relative to the package "
                                "directory") from None
        extra_ids.append(sub.id)
        dst = src.dst.strip("/")
        for f in sub.files:
            rel = posixpath.join(dst, f) if f else dst  # a file source is copied to dst itself
            context[rel] = ctx.source_file(posixpath.join(path, f) if f else path)
    hash_ = lkpkg.package_hash(tree.id, extra_ids)
    try:
        ref = lkpkg.reference(pkg, hash_, pkg.locs.get("tag"))
    except lkpkg.PackageError as e:
        raise _error(e) from None
    df_rel = _inside(ctx, pkg.dockerfile, None, pkg.where("dockerfile", yml))
    if df_rel not in tree.files:
        raise AnalysisError(f"the Dockerfile {pkg.dockerfile} is not in {top or '.'}",
                            location=_loc(pkg.where("dockerfile", yml)),
                            hint="dockerfile names a file of the package directory")
    df_art = context[df_rel]
    if ".dockerignore" in context:
        ignore = DockerIgnore(ctx.read_source(context[".dockerignore"]))
        context = {k: v for k, v in context.items() if not ignore.matches(k)}
    # LinuxKit passes these when the Dockerfile declares them (ARG PKG_HASH ...).
    args = {"PKG_HASH": hash_, "PKG_IMAGE": f"{pkg.org}/{pkg.image}" if pkg.org else pkg.image,
            **({"SOURCE": pkg.gitrepo} if pkg.gitrepo else {}),
            **pkg.build_args, **ctx.attr.build_args}
    bases = dict(ctx.attr.bases)
    for label in ctx.attr.packages:
        tag = ctx.dep(label).extra.get("linuxkit_tag")
        if tag is None:
            raise ctx.fail(f"{label} is not a linuxkit_package", attr="packages")
        bases.setdefault(tag, label)
    final = plan_dockerfile(ctx, df_art.path, ctx.read_source(df_art), context,
                            bases=bases, build_args=args, target="", arch=arch, primary=arch,
                            prefix=prefix, network="default" if pkg.network else "none")
    labels = dict(pkg.labels)
    if pkg.config is not None:
        labels[lkpkg.CONFIG_LABEL] = json.dumps(pkg.config, separators=(",", ":"))
    if pkg.gitrepo:
        labels["org.opencontainers.image.source"] = pkg.gitrepo
    if labels:
        final = _label_stage(ctx, final, labels, yml, arch)
    return archs.image_info(ctx, {arch: final}, tag=ref, linuxkit_tag=ref, linuxkit_hash=hash_)


def _label_stage(ctx, base, labels: dict[str, str], yml: str, arch: str):
    out = ctx.declare_dir(f"{ctx.label.name}.stages/build.yml-labels")
    step = {"cmd": "LABEL", "flags": {}, "args": [f"{k}={v}" for k, v in sorted(labels.items())],
            "json": False, "line": 0, "original": "LABEL (build.yml)", "heredocs": [], "env": {}}
    ctx.call("AssembleStage", {"dockerfile": yml, "stage": "build.yml", "platform": archs.platform(arch),
                               "base": {"kind": "stage", "path": base.path}, "steps": [step],
                               "layers": {}},
             inputs=[base], outputs=[out], mnemonic="AssembleStage",
             description=f"AssembleStage {ctx.label} [build.yml labels]")
    return out


def package_for(ctx, text: str, loc):
    """The label of the target in linuxkit_image's `packages` whose LinuxKit tag is
    `text`, else None. A reference to one of them by another hash is an error: the YAML
    names an older build of a package the workspace has (`linuxkit pkg show-tag`)."""
    found = None
    for label in getattr(ctx.attr, "packages", None) or []:
        tag = ctx.dep(label).extra.get("linuxkit_tag")
        if tag is None:
            raise ctx.fail(f"{label} is not a linuxkit_package", attr="packages")
        if tag == text or "docker.io/" + tag == text:
            return label
        if text.rpartition(":")[0] in (tag.rpartition(":")[0], "docker.io/" + tag.rpartition(":")[0]):
            found = (label, tag)
    if found is not None and "@" not in text:
        raise AnalysisError(f"'{text}' names {found[0]} by a tag it no longer has: its "
                            f"content is now tagged {found[1]}",
                            location=Location(loc.file, loc.line, loc.col) if loc else None,
                            hint=f"write image: {found[1]} (or the label {found[0]}), or drop the "
                            "package from `packages` to pull the published image")
    return None


def register(rule_set) -> None:
    """The `forge.rules` entry point: hands this module's declarations to the rule set."""
    rule_set.add(linuxkit_package, LINUXKIT_PACKAGES)
