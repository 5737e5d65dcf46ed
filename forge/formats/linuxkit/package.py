"""LinuxKit packages (`linuxkit pkg build DIR`): a directory holding `build.yml` and a
Dockerfile, built into an image tagged by the content hash of the directory.

build.yml, as LinuxKit's pkglib reads it (go-yaml v3 with KnownFields: an unknown key is
an error): `image` (mandatory), `org` (default linuxkit), `tag` (a Go template over
`.Hash`, default `{{.Hash}}`), `dockerfile`, `arches`, `extra-sources` (`src:dst`),
`gitrepo`, `network`, `disable-cache`, `config` (an image entry's keys, stored as the
`org.mobyproject.config` label), `buildArgs` (`KEY=value`), `depends`. forge also reads
`disable-content-trust` (older LinuxKit; ignored) and `labels` (a forge extension: more
image labels).

The hash is what `git ls-tree HEAD -- DIR` prints for the package directory of a clean
checkout: the id of the git tree object of its content, computed here from the files
(`tree_id`), so it needs no git and no commit. With extra sources LinuxKit hashes the
package's tree id followed by each source's id (sha1 of the concatenated hex strings).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import yaml

from forge.formats.linuxkit.assembly import IMAGE_KEYS
from forge.formats.linuxkit.errors import AssemblyError, Loc
from forge.formats.linuxkit.yamlspec import Reader, parse_file

BUILD_YML = "build.yml"
DEFAULT_ARCHES = ("amd64", "arm64", "riscv64")
CONFIG_LABEL = "org.mobyproject.config"
# GOARCH names LinuxKit's `arches` holds (docker platforms linux/<arch>).
GOARCHES = ("386", "amd64", "arm", "arm64", "ppc64le", "riscv64", "s390x")

# moby.ImageConfig: an image entry's keys less what only an assembly can say.
_CONFIG = {k: v for k, v in IMAGE_KEYS.items() if k not in ("name", "image") and ".add" not in k}
_DOCKER_IMAGES = {"target-dir": "str", "target": "str", "from-file": "str", "list": "strs"}
_KEYS: dict[str, Any] = {
    "image": "str", "org": "str", "tag": "str", "dockerfile": "str", "arches": "strs",
    "extra-sources": "strs", "gitrepo": "str", "network": "bool", "disable-cache": "bool",
    "disable-content-trust": "bool", "config": _CONFIG, "buildArgs": "strs",
    "depends": {"docker-images": _DOCKER_IMAGES}, "labels": "map"}
_TEMPLATE = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")


class PackageError(AssemblyError):
    """A problem in a package's build.yml, at `build.yml:line:col`."""


@dataclass(frozen=True)
class ExtraSource:
    src: str   # as written, relative to the package directory
    dst: str   # the directory in the build context, "/"-rooted, cleaned
    loc: Loc


@dataclass(frozen=True)
class Package:
    image: str
    org: str = "linuxkit"
    tag: str = "{{.Hash}}"
    dockerfile: str = "Dockerfile"
    arches: tuple[str, ...] = DEFAULT_ARCHES
    extra_sources: tuple[ExtraSource, ...] = ()
    gitrepo: str = ""
    network: bool = False
    disable_cache: bool = False
    config: dict | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    locs: dict[str, Loc] = field(default_factory=dict)  # key -> where its value is written

    def where(self, key: str, file: str) -> Loc:
        return self.locs.get(key, Loc(file, 1, 1))


def load(text: str, file: str) -> Package:
    """The package that `file` (a build.yml) describes; PackageError at its line:col."""
    try:
        root, r = parse_file(file, text)
    except AssemblyError as e:
        raise PackageError(e.message, e.where, e.hint) from None
    if root is None:
        raise PackageError("build.yml is empty; it must name the image at least", file,
                           "write `image: <name>`")
    try:
        values = r.value(root, _KEYS, "build.yml")
    except AssemblyError as e:
        raise PackageError(e.message, e.where, e.hint) from None
    locs = {k.value: Loc(file, v.start_mark.line + 1, v.start_mark.column + 1)
            for k, v in root.value}
    if not values.get("image"):
        raise PackageError("build.yml has no 'image' (it is mandatory)", Loc(file, 1, 1),
                           "add `image: <name>`: the package is tagged <org>/<image>:<hash>")
    kw: dict[str, Any] = {"image": values["image"], "locs": locs}
    for key, name in (("org", "org"), ("tag", "tag"), ("dockerfile", "dockerfile"),
                      ("gitrepo", "gitrepo"), ("network", "network"),
                      ("disable-cache", "disable_cache"), ("config", "config"),
                      ("labels", "labels")):
        if values.get(key) is not None:
            kw[name] = values[key]
    if "arches" in values:
        for i, a in enumerate(values["arches"]):
            if a not in GOARCHES:
                raise PackageError(f"item {i + 1} of 'arches' is '{a}', not an architecture "
                                   "LinuxKit builds for", _item_loc(root, "arches", i, file),
                                   "use GOARCH names: " + ", ".join(GOARCHES))
        kw["arches"] = tuple(values["arches"])
    kw["extra_sources"] = tuple(_extra_source(root, s, i, file)
                                for i, s in enumerate(values.get("extra-sources") or []))
    args: dict[str, str] = {}
    for i, a in enumerate(values.get("buildArgs") or []):
        k, eq, v = a.partition("=")
        if not eq or not k:
            raise PackageError(f"build arg '{a}' is not KEY=value", _item_loc(root, "buildArgs", i, file),
                               "write e.g. `- VERSION=1.2`")
        if v.startswith("@lkt:"):
            raise PackageError(f"build arg '{a}': LinuxKit's @lkt: values (another package's "
                               "tag) are not supported by forge", _item_loc(root, "buildArgs", i, file),
                               "write the value, or use FROM with that package's tag and list "
                               "the package in `packages`")
        args[k] = v
    kw["build_args"] = args
    dimg = (values.get("depends") or {}).get("docker-images") or {}
    if dimg.get("list") or dimg.get("from-file"):
        raise PackageError("depends.docker-images (images saved into the build context) is not "
                           "supported by forge", locs.get("depends", Loc(file, 1, 1)),
                           "build those images as targets and COPY --from them, or drop the key")
    if "{{" in kw.get("tag", ""):
        render_tag(kw["tag"], "0" * 40, locs.get("tag"))  # a bad template fails here, at its line
    return Package(**kw)


def _item_loc(root: yaml.MappingNode, key: str, i: int, file: str) -> Loc:
    for k, v in root.value:
        if k.value == key and isinstance(v, yaml.SequenceNode) and i < len(v.value):
            n = v.value[i]
            return Loc(file, n.start_mark.line + 1, n.start_mark.column + 1)
    return Loc(file, 1, 1)


def _extra_source(root, text: str, i: int, file: str) -> ExtraSource:
    where = _item_loc(root, "extra-sources", i, file)
    parts = text.split(":")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise PackageError(f"extra source '{text}' is not src:dst", where,
                           "write e.g. `- ../common:/common` (src relative to the package "
                           "directory, dst in the build context)")
    return ExtraSource(parts[0], "/" + posixpath.normpath("/" + parts[1]).lstrip("/"), where)


def render_tag(template: str, hash_: str, where: Loc | None = None) -> str:
    """The tag for `hash_`: a Go text/template whose only field is `.Hash`, as LinuxKit's."""
    def field_of(m: re.Match) -> str:
        expr = m.group(1)
        if expr != ".Hash":
            raise PackageError(f"tag template uses '{{{{{expr}}}}}'; LinuxKit's tag templates "
                               "know only {{.Hash}}", where, "write e.g. `tag: \"v1-{{.Hash}}\"`")
        return hash_
    out = _TEMPLATE.sub(field_of, template)
    if "{{" in out or "}}" in out:
        raise PackageError(f"tag template '{template}' has an unclosed action", where,
                           "write {{.Hash}}")
    return out


def reference(pkg: Package, hash_: str, where: Loc | None = None) -> str:
    """`<org>/<image>:<tag>`; an empty tag is `latest`, as LinuxKit's Pkg.Tag()."""
    tag = render_tag(pkg.tag, hash_, where) or "latest"
    return f"{pkg.org}/{pkg.image}:{tag}" if pkg.org else f"{pkg.image}:{tag}"


# --- git object ids ----------------------------------------------------------------------

FILE, EXECUTABLE, SYMLINK, TREE = "100644", "100755", "120000", "40000"


def git_mode(st_mode: int) -> str:
    """The mode git records for a file of this stat mode (only the owner's x bit counts)."""
    import stat
    if stat.S_ISLNK(st_mode):
        return SYMLINK
    return EXECUTABLE if st_mode & stat.S_IXUSR else FILE


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_id(entries: Iterable[tuple[str, str, bytes]]) -> str:
    """The git tree id of files given as (relative posix path, git mode, content), where a
    symlink's content is its target. Directories come from the paths; as in git, an empty
    directory is not recorded."""
    root: dict = {}
    for path, mode, data in entries:
        *dirs, name = path.split("/")
        node = root
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = (mode, blob_id(data))
    return _tree(root)


def _tree(node: dict) -> str:
    items = []
    for name, v in node.items():
        if isinstance(v, dict):
            if not v:
                continue
            items.append((name + "/", TREE, name, _tree(v)))
        else:
            items.append((name, v[0], name, v[1]))
    items.sort(key=lambda t: t[0].encode())  # git orders a tree's name as if it ended in /
    body = b"".join(f"{mode} {name}".encode() + b"\0" + bytes.fromhex(oid)
                    for _, mode, name, oid in items)
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


def package_hash(tree: str, extra: Iterable[str] = ()) -> str:
    """LinuxKit's hash: the package's tree id, or with extra sources the sha1 of it
    followed by each source's id."""
    extra = "".join(extra)
    return hashlib.sha1((tree + extra).encode()).hexdigest() if extra else tree
