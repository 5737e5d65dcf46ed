"""The OCI runtime bundle config (`config.json`) and `runtime.json` for one image entry.

Follows LinuxKit's `ConfigToOCI` (pkg moby, config.go). Each setting comes from the
first of: the entry's own key, the image label `org.mobyproject.config` (a JSON object
with the keys of an entry), the image config (Entrypoint+Cmd, Env, WorkingDir only),
a fixed default. A `<key>.add` in the entry appends to the label's list instead of
replacing it. Defaults, as LinuxKit's: no capabilities; the host's net, ipc, uts and user
namespaces; new pid, mount and cgroup namespaces; Docker's /proc, /dev, /dev/pts, /sys,
/sys/fs/cgroup mounts; uid and gid 0. Like LinuxKit, the image's `User` is not used.

Output dicts keep the key order and omissions Go's encoding/json gives the runtime-spec
structs (`omitempty`), with mounts sorted by destination, bounding capabilities sorted
and maps sorted by key, so `json.dumps(config, indent=4)` is reproducible.
"""

from __future__ import annotations

import json
from typing import Any

from forge.formats.linuxkit.errors import AssemblyError, Loc
from forge.formats.linuxkit.assembly import (CAPABILITIES, ImageEntry,
                                    parse_label, parse_rlimit)

LABEL = "org.mobyproject.config"
OCI_VERSION = "1.1.0"
_DEFAULT_MOUNTS = {
    "/proc": ("proc", ["nosuid", "nodev", "noexec", "relatime"]),
    "/dev": ("tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
    "/dev/pts": ("devpts", ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]),
    "/sys": ("sysfs", ["nosuid", "noexec", "nodev"]),
    "/sys/fs/cgroup": ("cgroup", ["nosuid", "noexec", "nodev", "relatime", "ro"]),
}
_MOUNTPOINT = {"proc": "/proc", "devpts": "/dev/pts", "sysfs": "/sys", "cgroup": "/sys/fs/cgroup",
               "mqueue": "/dev/mqueue"}
_RESOURCE_ORDER = ("devices", "memory", "cpu", "pids", "blockIO", "hugepageLimits", "network",
                   "rdma", "unified")


class _Merge:
    """Looks a key up in the entry, then the label; knows where each value came from."""

    def __init__(self, entry: ImageEntry, label: dict[str, Any], label_where: str):
        self.entry, self.y, self.l, self.label_where = entry, entry.raw, label, label_where

    def get(self, key: str, default: Any = None) -> Any:
        return self.y[key] if key in self.y else self.l[key] if key in self.l else default

    def nonempty(self, key: str, default: str) -> str:
        # LinuxKit treats "" like unset for these plain strings (its assignStringEmpty).
        return self.y.get(key) or self.l.get(key) or default

    def items(self, key: str, default: Any = None) -> Any:
        if key in self.y:
            return self.y[key]
        base, add = self.l.get(key), self.y.get(key + ".add")
        if add is None:
            return default if base is None else base
        return [*(base or []), *(x for x in add if x not in (base or []))]

    def where(self, key: str) -> Loc | str:
        if key in self.y or key + ".add" in self.y:
            return self.entry.locs.get(key) or self.entry.locs.get(key + ".add", self.entry.loc)
        return self.label_where

    def fail(self, key: str, message: str, hint: str | None = None) -> AssemblyError:
        return AssemblyError(f"{message} (in '{key}' of {self.entry.what})", self.where(key), hint)


def runtime_config(entry: ImageEntry, image_config: dict, label_defaults: dict | None,
                   ids: dict[str, int], *, readonly_default: bool = False) -> tuple[dict, dict]:
    """(config.json, runtime.json) as dicts for `entry`.

    `image_config` is the image's OCI config, whole or just its `config` object.
    `label_defaults` is the parsed label; None reads it from the image config's Labels.
    `ids` comes from `allocate_ids`. `readonly_default` applies when neither the entry nor
    the label sets `readonly` (LinuxKit's own default is False).
    """
    cfg = image_config.get("config", image_config) or {}
    where = f"label {LABEL} of image '{entry.image}'"
    if label_defaults is None:
        text = (cfg.get("Labels") or {}).get(LABEL)
        label_defaults = parse_label(text, where, f"the label of {entry.what}") if text else {}
    else:
        label_defaults = parse_label(json.dumps(label_defaults, indent=1), where, f"the label of {entry.what}")
    m = _Merge(entry, label_defaults, where)

    readonly = m.get("readonly", readonly_default)
    process: dict[str, Any] = {"user": _user(m, ids)}
    args = m.get("command", [*(cfg.get("Entrypoint") or []), *(cfg.get("Cmd") or [])])
    env = m.get("env", cfg.get("Env") or [])
    _put(process, "args", args)
    _put(process, "env", env)
    process["cwd"] = m.nonempty("cwd", cfg.get("WorkingDir") or "/")
    process["capabilities"] = _capabilities(m)
    # Go's POSIXRlimit field order: type, hard, soft.
    _put(process, "rlimits", [{"type": t, "hard": h, "soft": so}
                              for t, so, h in (_rlimit(m, x) for x in m.items("rlimits", []))])
    if m.get("noNewPrivileges", False):
        process["noNewPrivileges"] = True
    if m.get("oomScoreAdj") is not None:
        process["oomScoreAdj"] = m.get("oomScoreAdj")

    config: dict[str, Any] = {"ociVersion": OCI_VERSION, "process": process,
                              "root": {"path": "rootfs", "readonly": True} if readonly else {"path": "rootfs"}}
    _put(config, "hostname", m.nonempty("hostname", ""))
    config["mounts"] = _mounts(m, readonly)
    _put(config, "annotations", dict(sorted(m.get("annotations", {}).items())))
    config["linux"] = _linux(m)
    return config, _runtime(m)


def _put(d: dict, key: str, value: Any) -> None:
    if value:
        d[key] = value


def _id(m: _Merge, key: str, value: Any, ids: dict[str, int]) -> int:
    if value is None or value in ("", "root"):
        return 0
    if isinstance(value, int):
        return value
    if value not in ids:
        raise m.fail(key, f"no image entry is named '{value}'",
                     "use a number, root, or the name of an onboot, onshutdown or service entry")
    return ids[value]


def _user(m: _Merge, ids: dict[str, int]) -> dict:
    user = {"uid": _id(m, "uid", m.get("uid"), ids), "gid": _id(m, "gid", m.get("gid"), ids)}
    _put(user, "additionalGids", [_id(m, "additionalGids", g, ids) for g in m.items("additionalGids", [])])
    return user


def _known_caps(m: _Merge, key: str) -> list[str]:
    caps = list(m.items(key, []))
    if len(caps) == 1 and caps[0].lower() in ("all", "none"):
        return list(CAPABILITIES) if caps[0].lower() == "all" else []
    for c in caps:
        if c not in CAPABILITIES:
            raise m.fail(key, f"unknown capability '{c}'", "capabilities are spelled like CAP_NET_ADMIN")
    return caps


def _capabilities(m: _Merge) -> dict:
    caps, ambient = _known_caps(m, "capabilities"), _known_caps(m, "ambient")
    bounding = sorted(set(caps) | set(ambient))
    out: dict[str, Any] = {}
    for key, value in (("bounding", bounding), ("effective", caps), ("inheritable", bounding),
                       ("permitted", bounding), ("ambient", ambient)):
        _put(out, key, value)
    return out


def _rlimit(m: _Merge, text: str) -> tuple[str, int, int]:
    try:
        return parse_rlimit(text)
    except ValueError as e:
        raise m.fail("rlimits", f'rlimit "{text}" {e}', 'write "name,soft,hard", e.g. "nofile,1024,4096"') from None


def _mount(dest: str, tp: str, src: str, opts: list[str] | None) -> dict:
    out = {"destination": dest}
    _put(out, "type", tp)
    _put(out, "source", src)
    _put(out, "options", opts)
    return out


def _mounts(m: _Merge, readonly: bool) -> list[dict]:
    mounts = {d: _mount(d, tp, tp, opts + (["ro"] if readonly and d in ("/dev", "/sys") else []))
              for d, (tp, opts) in _DEFAULT_MOUNTS.items()}
    for t in m.items("tmpfs", []):
        dest, _, opts = t.partition(":")
        if t.count(":") > 1:
            raise m.fail("tmpfs", f'cannot parse tmpfs "{t}": too many \':\'')
        mounts[dest] = _mount(dest, "tmpfs", "tmpfs", opts.split(",") if ":" in t else None)
    for b in m.items("binds", []):
        parts = b.split(":")
        if not 2 <= len(parts) <= 3:
            raise m.fail("binds", f'cannot parse bind "{b}"', 'write "/source:/destination[:opt1,opt2]"')
        # LinuxKit: no options means rw, rshared; given options always get rbind added.
        opts = [*parts[2].split(","), "rbind"] if len(parts) == 3 else ["rw", "rbind", "rshared"]
        mounts[parts[1]] = _mount(parts[1], "bind", parts[0], opts)
    for mt in m.items("mounts", []):
        src, dest = mt.get("source", ""), mt.get("destination", "")
        tp = mt.get("type") or (src if src in ("mqueue", "devpts", "proc", "sysfs", "cgroup") else "")
        tp = tp or ("tmpfs" if dest == "/dev" else "")
        if not tp:
            raise m.fail("mounts", f"the mount at '{dest}' has no type", "add type: (bind, tmpfs, proc, ...)")
        dest = dest or _MOUNTPOINT.get(tp, "")
        if not dest:
            raise m.fail("mounts", f"the {tp} mount has no destination", "add destination:")
        mounts[dest] = _mount(dest, tp, src or tp, mt.get("options"))
    return [mounts[d] for d in sorted(mounts)]


def _namespaces(m: _Merge) -> list[dict]:
    out = []
    # net, ipc, uts and user default to the host's; pid to a new one; "new" asks for one.
    for key, kind, default in (("net", "network", "root"), ("ipc", "ipc", "root"),
                               ("uts", "uts", "root"), ("pid", "pid", ""), ("userns", "user", "root")):
        ns = m.nonempty(key, default)
        if ns in ("host", "root"):
            continue
        path = "" if ns == "new" or (key == "net" and ns == "none") else ns
        out.append({"type": kind, "path": path} if path else {"type": kind})
    return [*out, {"type": "mount"}, {"type": "cgroup"}]


def _linux(m: _Merge) -> dict:
    resources = dict(m.get("resources", {}))
    if "blockio" in resources:  # LinuxKit's schema spells it so; Go's JSON matching folds case
        resources["blockIO"] = resources.pop("blockio")
    dev_cgroups, devices = list(resources.get("devices", [])), []
    for d in m.items("devices", []):
        rule = {"allow": True}
        _put(rule, "type", d.get("type", ""))
        if d.get("path") == "all":
            dev_cgroups.append({**rule, "access": "rwm"})
            continue
        if not all(c in "01234567" for c in d.get("mode", "")) or not d.get("mode"):
            raise m.fail("devices", f"cannot read mode of device '{d.get('path')}' as octal",
                         'add e.g. mode: "0666"')
        devices.append({"path": d.get("path", ""), "type": d.get("type", ""), "major": d.get("major", 0),
                        "minor": d.get("minor", 0), "fileMode": int(d["mode"], 8)})
        dev_cgroups.append({**rule, "major": d.get("major", 0), "minor": d.get("minor", 0), "access": "rwm"})
    if dev_cgroups:
        resources["devices"] = dev_cgroups
    out: dict[str, Any] = {}
    _put(out, "uidMappings", [_idmap(x) for x in m.items("uidMappings", [])])
    _put(out, "gidMappings", [_idmap(x) for x in m.items("gidMappings", [])])
    _put(out, "sysctl", dict(sorted(m.get("sysctl", {}).items())))
    out["resources"] = {k: resources[k] for k in sorted(resources, key=_resource_rank)}
    _put(out, "cgroupsPath", m.get("cgroupsPath", ""))
    out["namespaces"] = _namespaces(m)
    _put(out, "devices", devices)
    _put(out, "rootfsPropagation", m.get("rootfsPropagation", ""))
    _put(out, "maskedPaths", m.items("maskedPaths", []))
    _put(out, "readonlyPaths", m.items("readonlyPaths", []))
    return out


def _resource_rank(key: str) -> tuple[int, str]:
    return (_RESOURCE_ORDER.index(key) if key in _RESOURCE_ORDER else len(_RESOURCE_ORDER), key)


def _idmap(x: dict) -> dict:
    return {"containerID": x.get("containerID", 0), "hostID": x.get("hostID", 0), "size": x.get("size", 0)}


def _runtime(m: _Merge) -> dict:
    y, lab = m.y.get("runtime", {}), m.l.get("runtime", {})

    def pick(key: str, default: Any) -> Any:
        return y[key] if key in y else lab[key] if key in lab else default

    bind_y, bind_l = y.get("bindNS", {}), lab.get("bindNS", {})
    return {
        "cgroups": pick("cgroups", []),
        "mounts": [_mount(x.get("destination", ""), x.get("type", ""), x.get("source", ""), x.get("options"))
                   for x in pick("mounts", [])],
        "mkdir": pick("mkdir", []),
        "interfaces": [{**{k: i[k] for k in ("name", "add", "peer") if i.get(k)},
                        "createInRoot": i.get("createInRoot", False)} for i in pick("interfaces", [])],
        "bindNS": {k: bind_y.get(k, bind_l.get(k, "")) for k in
                   ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts")},
        "namespace": pick("namespace", ""),
    }
