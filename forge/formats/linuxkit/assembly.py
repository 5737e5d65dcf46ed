"""LinuxKit assembly files (the YAML of `linuxkit build`), read with exact error locations.

The format is LinuxKit's (see docs/reference/assembly-format.md): top-level `kernel`,
`init`, `onboot`, `onshutdown`, `services`, `files`, `volumes` and the ignored `trust`.
Unknown keys are errors, as in LinuxKit's JSON schema (additionalProperties false).
Scalars resolve as YAML 1.2 (LinuxKit uses go-yaml v3): `yes`/`on` are strings, not
booleans, so `readonly: yes` is reported instead of silently meaning true.

`load()` walks `yaml.compose` nodes itself rather than loading plain data, so that every
`AssemblyError` names the `file:line:col` (1-based) of the offending key or value. Each
entry keeps `raw`, the plain values of exactly the keys that were written, because a key
left out must fall back to the image label's default (`assembly_oci.runtime_config`).

forge extensions: an `image:` may be a forge label (`//images/redis:image`), reported by
`image_refs()` and never resolved here; `<key>.add` (append to the label's default) is
accepted for every list key of an image entry, not only `capabilities` and `binds`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from forge.formats.linuxkit.errors import AssemblyError, Loc
from forge.formats.linuxkit.yamlspec import Reader, kind_of, loc, parse_file

SECTIONS = ("onboot", "onshutdown", "services")
_SECTION_NOUN = {"onboot": "onboot entry", "onshutdown": "onshutdown entry", "services": "service"}
# Numbers 0..40 in order, as moby/sys/capability lists them: "all" expands to this order.
CAPABILITIES = tuple("CAP_" + c for c in (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
    "CHECKPOINT_RESTORE").split())
RLIMITS = tuple("RLIMIT_" + r for r in "CPU FSIZE DATA STACK CORE RSS NPROC NOFILE MEMLOCK AS "
                "LOCKS SIGPENDING MSGQUEUE NICE RTPRIO RTTIME".split())
UNLIMITED = 2 ** 64 - 1
_VOLUME_NAME = re.compile(r"^[a-z0-9_-]*$")
_PLATFORM = re.compile(r"^[a-z0-9_]+/[a-z0-9_]+(/[a-z0-9_]+)?$")

# Type specs (forge.formats.linuxkit.yamlspec): a name, a dict of keys, or a one-item list.
_MOUNT = {"destination": "str", "type": "str", "source": "str", "options": "strs"}
_DEVICE = {"path": "str", "type": "str", "major": "int", "minor": "int", "mode": "str"}
_IDMAP = {"containerID": "int", "hostID": "int", "size": "int"}
# Only the top level of the OCI LinuxResources object is checked; runc checks the rest.
_RESOURCES = dict.fromkeys(("devices", "memory", "cpu", "pids", "blockIO", "blockio",
                            "hugepageLimits", "network", "rdma", "unified"), "any")
_NAMESPACES = dict.fromkeys(("cgroup", "ipc", "mnt", "net", "pid", "user", "uts"), "str")
_RUNTIME = {"cgroups": "strs", "mounts": [_MOUNT], "mkdir": "strs", "bindNS": _NAMESPACES,
            "interfaces": [{"name": "str", "add": "str", "peer": "str", "createInRoot": "bool"}],
            "namespace": "str"}
IMAGE_KEYS: dict[str, Any] = {
    "name": "str", "image": "str", "capabilities": "strs", "ambient": "strs", "mounts": [_MOUNT],
    "binds": "strs", "tmpfs": "strs", "devices": [_DEVICE], "command": "strs", "env": "strs",
    "cwd": "str", "net": "str", "pid": "str", "ipc": "str", "uts": "str", "userns": "str",
    "readonly": "bool", "maskedPaths": "strs", "readonlyPaths": "strs", "uid": "id", "gid": "id",
    "additionalGids": "ids", "noNewPrivileges": "bool", "hostname": "str", "oomScoreAdj": "int",
    "rootfsPropagation": "str", "cgroupsPath": "str", "resources": _RESOURCES, "sysctl": "map",
    "rlimits": "strs", "uidMappings": [_IDMAP], "gidMappings": [_IDMAP], "annotations": "map",
    "runtime": _RUNTIME}
IMAGE_KEYS.update({f"{k}.add": v for k, v in list(IMAGE_KEYS.items())
                   if (v in ("strs", "ids") or isinstance(v, list)) and k != "command"})
_KERNEL = dict.fromkeys(("image", "cmdline", "binary", "tar", "ucode"), "str")
_FILE = {"path": "str", "directory": "bool", "symlink": "str", "contents": "str", "source": "str",
         "metadata": "str", "optional": "bool", "mode": "str", "uid": "id", "gid": "id"}
_VOLUME = {"name": "str", "image": "str", "readonly": "bool", "format": "str", "platforms": "strs"}
_TOP = {"kernel": _KERNEL, "init": "strs", "onboot": "entries", "onshutdown": "entries",
        "services": "entries", "files": "entries", "volumes": "entries", "trust": "any"}


@dataclass(frozen=True)
class Kernel:
    """`tar` None means `tar: none` (no modules); `raw` holds the keys as written."""
    image: str | None
    cmdline: str = ""
    binary: str = "kernel"
    tar: str | None = "kernel.tar"
    ucode: str | None = None
    loc: Loc | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageEntry:
    """One onboot/onshutdown/services entry. `raw` maps each key written (name and image
    included) to its plain value; `locs` maps it to where that key was written."""
    section: str
    name: str
    image: str
    loc: Loc
    raw: dict[str, Any]
    locs: dict[str, Loc]

    @property
    def what(self) -> str:
        return f"{_SECTION_NOUN[self.section]} '{self.name}'"


@dataclass(frozen=True)
class FileEntry:
    """`mode` is resolved (0600, 0700 for directories); `source` is not `~/`-expanded."""
    path: str
    loc: Loc
    raw: dict[str, Any]
    locs: dict[str, Loc]
    contents: str | None = None
    source: str | None = None
    directory: bool = False
    symlink: str | None = None
    metadata: str | None = None
    optional: bool = False
    mode: int = 0o600
    uid: int | str | None = None
    gid: int | str | None = None

    @property
    def what(self) -> str:
        return f"file '{self.path}'"


@dataclass(frozen=True)
class Volume:
    name: str
    loc: Loc
    raw: dict[str, Any]
    image: str | None = None
    readonly: bool = False
    format: str = "oci"
    platforms: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Assembly:
    kernel: Kernel | None
    init: list[str]
    onboot: list[ImageEntry]
    onshutdown: list[ImageEntry]
    services: list[ImageEntry]
    files: list[FileEntry]
    volumes: list[Volume]
    init_locs: list[Loc] = field(default_factory=list)  # where each `init` item is written

    def entries(self) -> list[ImageEntry]:
        """All image entries in id order: onboot, onshutdown, services."""
        return [*self.onboot, *self.onshutdown, *self.services]


def parse_label(text: str, where: str, what: str = "the label") -> dict[str, Any]:
    """Validate the `org.mobyproject.config` label text (JSON, read as YAML) like an entry
    without `name` and `image`; `where` names it in errors ("label ... of redis:7")."""
    root, r = parse_file(where, text)
    if root is None:
        return {}
    keys = {k: v for k, v in IMAGE_KEYS.items() if k not in ("name", "image")}
    return r.value(root, keys, what)


def parse_rlimit(text: str) -> tuple[str, int, int]:
    """`"nofile,100,200"` -> ("RLIMIT_NOFILE", 100, 200); `unlimited` is 2**64-1. ValueError
    says what is wrong."""
    parts = [p.strip() for p in text.split(",", 2)]
    if len(parts) != 3:
        raise ValueError("is not of the form \"name,soft,hard\"")
    name = parts[0].upper() if parts[0].upper().startswith("RLIMIT_") else "RLIMIT_" + parts[0].upper()
    if name not in RLIMITS:
        close = difflib.get_close_matches(name, RLIMITS, n=1)
        raise ValueError("names no known limit" + (f"; did you mean {close[0]}?" if close else ""))
    nums = [UNLIMITED if p.lower() == "unlimited" else int(p) if p.isdigit() else None for p in parts[1:]]
    if None in nums or max(nums) > UNLIMITED:
        raise ValueError("needs soft and hard limits that are numbers or unlimited")
    return name, nums[0], nums[1]


def _bind_problem(text: str) -> str | None:
    n = len(text.split(":"))
    return None if 2 <= n <= 3 else "is missing ':'" if n < 2 else "has too many ':'"


def _check_items(r: Reader, node: yaml.Node, what: str, problem, hint: str) -> None:
    for i, item in enumerate(node.value, 1):
        why = problem(item.value)
        if why:
            raise r.fail(item, f'item {i} of {what}, "{item.value}", {why}', hint)


def _capability(text: str) -> str | None:
    if text in CAPABILITIES:
        return None
    close = difflib.get_close_matches(text.upper(), CAPABILITIES, n=1)
    return "is not a known capability" + (f"; did you mean {close[0]}?" if close else "")


def _entry(r: Reader, node: yaml.Node, noun: str, i: int, keys: dict, name_key: str):
    """Common walk of one list item: (what, raw, locs, key nodes, value nodes)."""
    r.expect(node, isinstance(node, yaml.MappingNode), "a mapping", f"{noun} {i}")
    named = [v for k, v in node.value if k.value == name_key and kind_of(v) == "string"]
    what = f"{noun} '{named[0].value}'" if named else f"{noun} {i}"
    pairs = r.pairs(node, keys, f" in {what}")
    raw = {k: r.value(v, keys[k], f"'{k}' of {what}") for k, _, v in pairs}
    return what, raw, {k: loc(kn, r.file) for k, kn, _ in pairs}, {k: v for k, _, v in pairs}


def _require(r: Reader, node: yaml.Node, what: str, raw: dict, key: str, hint: str) -> None:
    if key not in raw:
        raise r.fail(node, f"{what} has no '{key}'", hint)


def _error_of(fn, text: str) -> str | None:
    try:
        fn(text)
    except ValueError as e:
        return str(e)
    return None


_ITEM_CHECKS = {
    "binds": (_bind_problem, 'write "/source:/destination" or "/source:/destination:opt1,opt2"'),
    "tmpfs": (lambda t: "has too many ':'" if t.count(":") > 1 else None,
              'write "/destination" or "/destination:opt1,opt2"'),
    "rlimits": (lambda t: _error_of(parse_rlimit, t),
                'write "name,soft,hard", e.g. "nofile,1024,4096" (a limit may be "unlimited")'),
    "capabilities": (_capability, "capabilities are spelled like CAP_NET_ADMIN; "
                     "a single 'all' or 'none' is also allowed"),
}
_ITEM_CHECKS["ambient"] = _ITEM_CHECKS["capabilities"]


def image_entry(r: Reader, node: yaml.Node, section: str, i: int) -> ImageEntry:
    what, raw, locs, nodes = _entry(r, node, _SECTION_NOUN[section], i, IMAGE_KEYS, "name")
    _require(r, node, what, raw, "name", "every image entry needs a 'name': it names the "
             "container, its directory and its uid/gid")
    _require(r, node, what, raw, "image", "add 'image:' with the image to run, a registry "
             "reference or a forge label such as //images/redis:image")
    for key, vnode in nodes.items():
        check = _ITEM_CHECKS.get(key.removesuffix(".add"))
        caps = raw[key] if key.startswith(("capabilities", "ambient")) else []
        if check and not (len(caps) == 1 and caps[0].lower() in ("all", "none")):
            _check_items(r, vnode, f"'{key}' of {what}", *check)
    for key in ("devices", "devices.add"):
        for dev, dnode in zip(raw.get(key, []), nodes[key].value if key in nodes else []):
            if dev.get("path") != "all" and not re.fullmatch(r"[0-7]+", dev.get("mode", "")):
                raise r.fail(dnode, f"device '{dev.get('path')}' of {what} needs an octal 'mode'",
                             'add e.g. mode: "0666" (only path: all, which allows a whole type, needs none)')
    return ImageEntry(section, raw["name"], raw["image"], loc(node, r.file), raw, locs)


_CONTENT_KEYS = ("contents", "source", "directory", "symlink", "metadata")


def file_entry(r: Reader, node: yaml.Node, _section: str, i: int) -> FileEntry:
    what, raw, locs, nodes = _entry(r, node, "file", i, _FILE, "path")
    _require(r, node, what, raw, "path", "add 'path:' with where the file goes in the image")
    given = [k for k in _CONTENT_KEYS if k in raw and raw[k] is not False]
    hint = "a file entry takes exactly one of " + ", ".join(_CONTENT_KEYS[:3]) + " (true), symlink, metadata"
    if len(given) > 1:
        raise AssemblyError(f"{what} sets both '{given[0]}' and '{given[1]}'", locs[given[1]], hint)
    if not given:
        raise r.fail(node, f"{what} says nothing about what to write", hint)
    if raw.get("metadata", "yaml") not in ("yaml", "json"):
        raise r.fail(nodes["metadata"], f"'metadata' of {what} must be yaml or json; got \"{raw['metadata']}\"")
    mode = raw.get("mode")
    if mode is not None and not re.fullmatch(r"0?[0-7]{1,4}", mode):
        raise r.fail(nodes["mode"], f"'mode' of {what} must be an octal string; got \"{mode}\"",
                     'write the permission bits in octal, quoted: mode: "0644"')
    return FileEntry(raw["path"], loc(node, r.file), raw, locs, raw.get("contents"), raw.get("source"),
                     raw.get("directory", False), raw.get("symlink"), raw.get("metadata"),
                     raw.get("optional", False),
                     int(mode, 8) if mode else 0o700 if raw.get("directory") else 0o600,
                     raw.get("uid"), raw.get("gid"))


def volume(r: Reader, node: yaml.Node, _section: str, i: int) -> Volume:
    what, raw, locs, nodes = _entry(r, node, "volume", i, _VOLUME, "name")
    _require(r, node, what, raw, "name", "add 'name:'; the volume appears at /containers/volumes/<name>")
    if not _VOLUME_NAME.fullmatch(raw["name"]):
        raise r.fail(nodes["name"], f"{what} has an invalid name",
                     "use only lower-case letters, digits, '-' and '_'")
    if raw.get("format", "oci") not in ("oci", "filesystem"):
        raise r.fail(nodes["format"], f"'format' of {what} must be oci or filesystem; got \"{raw['format']}\"")
    for i, (plat, pnode) in enumerate(zip(raw.get("platforms", []), nodes.get("platforms", yaml.SequenceNode("", [])).value), 1):
        if not _PLATFORM.fullmatch(plat):
            raise r.fail(pnode, f'item {i} of \'platforms\' of {what}, "{plat}", is not a platform',
                         'write os/architecture[/variant], e.g. "linux/arm64" or "linux/arm/v7"')
    return Volume(raw["name"], loc(node, r.file), raw, raw.get("image"), raw.get("readonly", False),
                  raw.get("format", "oci"), raw.get("platforms", []))


VOLUMES_DIR = "containers/volumes"


def volume_binds(entry: ImageEntry, volumes: list[Volume]) -> dict[str, Any]:
    """The entry's `raw` with each bind (in `binds`, `binds.add` and bind `mounts`) whose
    source is a volume name pointed at that volume's merged directory, as LinuxKit does
    before it merges the image label. A read-only volume must be bound read-only."""
    by_name = {v.name: v for v in volumes}
    raw = dict(entry.raw)

    def volume_of(source: str, key: str) -> Volume:
        v = by_name.get(source)
        if v is None:
            close = difflib.get_close_matches(source, list(by_name), n=1)
            raise AssemblyError(
                f"'{key}' of {entry.what} binds '{source}', which is no volume"
                + (f"; did you mean '{close[0]}'?" if close else ""), entry.locs.get(key, entry.loc),
                "a bind's source is an absolute path or the name of an entry of `volumes:`")
        return v

    def readonly_violation(v: Volume, key: str) -> AssemblyError:
        return AssemblyError(f"volume '{v.name}' is read-only, but {entry.what} binds it read-write "
                             f"(in '{key}')", entry.locs.get(key, entry.loc),
                             "add :ro to the bind (name:/path:ro), or drop `readonly: true` from the volume")

    for key in ("binds", "binds.add"):
        if key not in raw:
            continue
        out = []
        for b in raw[key]:
            parts = b.split(":")
            if not parts[0].startswith("/"):
                v = volume_of(parts[0], key)
                if v.readonly and (len(parts) < 3 or parts[2] != "ro"):
                    raise readonly_violation(v, key)
                parts[0] = f"/{VOLUMES_DIR}/{v.name}/merged"
            out.append(":".join(parts))
        raw[key] = out
    for key in ("mounts", "mounts.add"):
        if key not in raw:
            continue
        out = []
        for mt in raw[key]:
            src = mt.get("source", "")
            if mt.get("type") == "bind" and not src.startswith("/"):
                v = volume_of(src, key)
                first = next((o for o in mt.get("options") or [] if o in ("ro", "rw")), None)
                if v.readonly and first != "ro":
                    raise readonly_violation(v, key)
                mt = {**mt, "source": f"/{VOLUMES_DIR}/{v.name}/merged"}
            out.append(mt)
        raw[key] = out
    return raw


def check_names(asm: Assembly) -> None:
    """Names LinuxKit requires unique, and `uid: <name>` references that must exist."""
    for kind, items in (("service", asm.services), ("volume", asm.volumes)):
        first: dict[str, Loc] = {}
        for it in items:
            if it.name in first:
                raise AssemblyError(f"duplicate {kind} name '{it.name}'", it.loc,
                                    f"the first is at {first[it.name]}; {kind} names must be unique "
                                    "because each runs from its own directory; rename one")
            first[it.name] = it.loc
    ids = allocate_ids(asm)
    for it in [*asm.entries(), *asm.files]:
        for key in ("uid", "gid", "additionalGids", "additionalGids.add"):
            vals = it.raw.get(key)
            for v in vals if isinstance(vals, list) else [vals]:
                if isinstance(v, str) and v not in ("", "root") and v not in ids:
                    close = difflib.get_close_matches(v, list(ids), n=1)
                    raise AssemblyError(
                        f"'{key}' of {it.what} names '{v}', which is no onboot, onshutdown or service "
                        "entry" + (f"; did you mean '{close[0]}'?" if close else ""), it.locs[key],
                        "use a number, root, or the name of an image entry (each gets an id from 100)")


def allocate_ids(asm: Assembly) -> dict[str, int]:
    """LinuxKit's uid/gid per entry name: 100, 101, ... over onboot, onshutdown, services.
    A name used twice keeps the later number, and still uses up the earlier one."""
    return {e.name: n for n, e in enumerate(asm.entries(), 100)}


def image_refs(asm: Assembly) -> set[str]:
    """Every image the assembly names (kernel, init, entries, volumes), as written:
    registry references or forge labels (`//pkg:target`), for the caller to resolve."""
    refs = set(asm.init) | {e.image for e in asm.entries()} | {v.image for v in asm.volumes if v.image}
    return refs | ({asm.kernel.image} if asm.kernel and asm.kernel.image else set())


def load(files: list[tuple[str, str]]) -> Assembly:
    """Read and merge (display path, YAML text) pairs in order, as `linuxkit build a.yml
    b.yml` does: a later file's kernel keys win, every list is concatenated."""
    kernel_raw: dict[str, Any] = {}
    kernel_loc: Loc | None = None
    init_locs: list[Loc] = []
    parts: dict[str, list] = {k: [] for k in ("init", *SECTIONS, "files", "volumes")}
    for file, text in files:
        root, r = parse_file(file, text)
        if root is None:
            continue
        r.expect(root, isinstance(root, yaml.MappingNode), "a mapping of sections", "an assembly file")
        for key, knode, v in r.pairs(root, _TOP, ""):
            if key == "kernel":
                got = r.value(v, _KERNEL, "'kernel'")
                # LinuxKit's AppendConfig: an empty string never overrides an earlier value.
                kernel_raw.update({k: x for k, x in got.items() if x or k in ("tar", "ucode")})
                kernel_loc = loc(knode, file)
            elif key == "init":
                parts["init"] += r.value(v, "strs", "'init'")
                init_locs += [loc(n, file) for n in v.value] if isinstance(v, yaml.SequenceNode) else []
            elif key == "trust":
                continue
            else:
                r.expect(v, isinstance(v, yaml.SequenceNode) or kind_of(v) == "null", "a list", f"'{key}'")
                make = {"files": file_entry, "volumes": volume}.get(key, image_entry)
                for i, n in enumerate(v.value if isinstance(v, yaml.SequenceNode) else [], 1):
                    parts[key].append(make(r, n, key, i))
    kernel = None
    if kernel_loc:
        tar = kernel_raw.get("tar", "kernel.tar")
        kernel = Kernel(kernel_raw.get("image"), kernel_raw.get("cmdline", ""),
                        kernel_raw.get("binary", "kernel"), None if tar == "none" else tar,
                        kernel_raw.get("ucode"), kernel_loc, kernel_raw)
    asm = Assembly(kernel, parts["init"], parts["onboot"], parts["onshutdown"], parts["services"],
                   parts["files"], parts["volumes"], init_locs)
    check_names(asm)
    return asm
