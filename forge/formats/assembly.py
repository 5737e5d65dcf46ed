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

# Type specs: a scalar/list name below, a dict (a mapping with exactly those keys), or a
# one-item list (a list of that spec).
_DESCRIBE = {"str": "a string", "bool": "a boolean", "int": "an integer", "strs": "a list of strings",
             "id": "a number or an entry name", "ids": "a list of numbers or entry names",
             "map": "a mapping of strings to strings", "any": "a value"}
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


class AssemblyError(Exception):
    """A problem in an assembly: `file.yml:7:5: message`, with `hint` saying how to fix it."""

    def __init__(self, message: str, where: "Loc | str | None" = None, hint: str | None = None):
        super().__init__(message)
        self.message, self.where, self.hint = message, where, hint
        self.file = where.file if isinstance(where, Loc) else where
        self.line = where.line if isinstance(where, Loc) else 0
        self.col = where.col if isinstance(where, Loc) else 0

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass(frozen=True)
class Loc:
    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


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
    contents: str | None = None
    source: str | None = None
    directory: bool = False
    symlink: str | None = None
    metadata: str | None = None
    optional: bool = False
    mode: int = 0o600
    uid: int | str | None = None
    gid: int | str | None = None


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

    def entries(self) -> list[ImageEntry]:
        """All image entries in id order: onboot, onshutdown, services."""
        return [*self.onboot, *self.onshutdown, *self.services]


# ---------------------------------------------------------------------------------------
# YAML 1.2 core schema, which is what go-yaml v3 (and so LinuxKit) resolves plain scalars by

class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers: dict = {}


for _tag, _re, _first in (
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
        ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
        ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                  r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789")):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_re), list(_first))

_KIND = {"str": "string", "int": "integer", "bool": "boolean", "null": "null", "float": "number"}


def _loc(node: yaml.Node, file: str) -> Loc:
    return Loc(file, node.start_mark.line + 1, node.start_mark.column + 1)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return _KIND.get(node.tag.rsplit(":", 1)[-1], node.tag)


def _got(node: yaml.Node) -> str:
    kind = _kind(node)
    if kind == "string":
        return f'string "{node.value}"'
    return f"{kind} {node.value}" if isinstance(node, yaml.ScalarNode) and node.value else kind


def _scalar(node: yaml.ScalarNode) -> Any:
    v, kind = node.value, _kind(node)
    if kind == "integer":
        return int(v[2:], 8) if v.startswith("0o") else int(v, 16) if v.startswith("0x") else int(v)
    return {"boolean": lambda: v.lower() == "true", "null": lambda: None,
            "number": lambda: float(v.replace("inf", "Inf").lower())}.get(kind, lambda: v)()


class _Reader:
    """Walks one file's nodes against the type specs, raising located errors."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, node: yaml.Node, message: str, hint: str | None = None) -> AssemblyError:
        return AssemblyError(message, _loc(node, self.file), hint)

    def pairs(self, node: yaml.MappingNode, keys: dict, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        seen: dict[str, yaml.Node] = {}
        out = []
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if key in seen:
                raise self.fail(k, f"duplicate key '{key}'{what}",
                                f"it is already set at line {seen[key].start_mark.line + 1}; keep one")
            if key not in keys:
                close = difflib.get_close_matches(str(key), list(keys), n=1)
                tail = f"; did you mean '{close[0]}'?" if close else ""
                raise self.fail(k, f"unknown key '{key}'{what}{tail}",
                                None if close else "valid keys: " + ", ".join(sorted(keys)))
            seen[key] = k
            out.append((key, k, v))
        return out

    def value(self, node: yaml.Node, spec: Any, what: str) -> Any:
        """`what` names the value in messages: "'readonly' of service 'redis'"."""
        if isinstance(spec, dict):
            self.expect(node, isinstance(node, yaml.MappingNode), "a mapping", what)
            return {k: self.value(v, spec[k], f"'{k}' of {what}")
                    for k, _, v in self.pairs(node, spec, f" in {what}")}
        if isinstance(spec, list) or spec in ("strs", "ids"):
            self.expect(node, isinstance(node, yaml.SequenceNode),
                        "a list" if isinstance(spec, list) else _DESCRIBE[spec], what)
            item = spec[0] if isinstance(spec, list) else spec[:-1]
            return [self.value(n, item, f"item {i} of {what}") for i, n in enumerate(node.value, 1)]
        if spec == "map":
            self.expect(node, isinstance(node, yaml.MappingNode), _DESCRIBE[spec], what)
            self.pairs(node, {k.value: 0 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}, f" in {what}")
            return {k.value: self.value(v, "str", f"'{k.value}' of {what}") for k, v in node.value}
        if spec == "any":
            return yaml.load(yaml.serialize(node), Loader=_Loader)
        ok = isinstance(node, yaml.ScalarNode) and (
            _kind(node) in {"str": ("string",), "bool": ("boolean",), "int": ("integer",),
                            "id": ("string", "integer")}[spec])
        self.expect(node, ok, _DESCRIBE[spec], what)
        return _scalar(node)

    def expect(self, node: yaml.Node, ok: bool, want: str, what: str) -> None:
        if ok:
            return
        hint = None
        if want == "a boolean" and _kind(node) == "string":
            hint = "write true or false (in YAML 1.2, which LinuxKit reads, yes/no/on/off are strings)"
        elif want == "a string" and isinstance(node, yaml.ScalarNode):
            hint = f'quote it: "{node.value}"'
        elif want.startswith("a list") and isinstance(node, yaml.ScalarNode):
            hint = f'write a YAML list, e.g. [{node.value}], or one "- item" per line'
        raise self.fail(node, f"{what} must be {want}; got {_got(node)}", hint)


def _parse_file(file: str, text: str) -> tuple[yaml.Node | None, _Reader]:
    try:
        return yaml.compose(text, Loader=_Loader), _Reader(file)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = Loc(file, mark.line + 1, mark.column + 1) if mark else file
        ctx = f" ({e.context})" if e.context else ""
        raise AssemblyError(f"YAML syntax error: {e.problem}{ctx}", where,
                            "check the indentation and quoting on this line and the one before") from None
    except yaml.YAMLError as e:
        raise AssemblyError(f"YAML error: {e}", file) from None


def load(files: list[tuple[str, str]]) -> Assembly:
    """Read and merge (display path, YAML text) pairs in order, as `linuxkit build a.yml
    b.yml` does: a later file's kernel keys win, every list is concatenated."""
    kernel_raw: dict[str, Any] = {}
    kernel_loc: Loc | None = None
    parts: dict[str, list] = {k: [] for k in ("init", *SECTIONS, "files", "volumes")}
    for file, text in files:
        root, r = _parse_file(file, text)
        if root is None:
            continue
        r.expect(root, isinstance(root, yaml.MappingNode), "a mapping of sections", "an assembly file")
        for key, knode, v in r.pairs(root, _TOP, ""):
            if key == "kernel":
                got = r.value(v, _KERNEL, "'kernel'")
                # LinuxKit's AppendConfig: an empty string never overrides an earlier value.
                kernel_raw.update({k: x for k, x in got.items() if x or k in ("tar", "ucode")})
                kernel_loc = _loc(knode, file)
            elif key == "init":
                parts["init"] += r.value(v, "strs", "'init'")
            elif key == "trust":
                continue
            else:
                r.expect(v, isinstance(v, yaml.SequenceNode) or _kind(v) == "null", "a list", f"'{key}'")
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
                   parts["files"], parts["volumes"])
    check_names(asm)
    return asm
