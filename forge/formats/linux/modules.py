"""Linux kernel modules: their `.modinfo`, and the order to load them in.

A module (`*.ko`) is an ELF relocatable object. Its `.modinfo` section is a run of
NUL-terminated `key=value` strings (with NUL padding between some of them); keys repeat
(`alias`, `parm`, `firmware`), so every key maps to a list of values. The keys used here:

* `name`: the module's name as the kernel knows it (`-` in a file name becomes `_`);
  older modules lack it, and the file stem stands in;
* `depends`: a comma-separated list, possibly empty, of the modules whose symbols this one
  uses. They must be loaded first. This is what `depmod` turns into `modules.dep`, which
  Debian's cloud kernel package does not ship.

`softdep` ("pre: x post: y") names modules the module works better with but does not
need; it is ignored, as `insmod` would. Files may be compressed whole: `.ko.xz`, `.ko.gz`,
`.ko.zst`, recognised by their magic bytes. Signed modules carry the signature after the ELF data, which section
headers never point into, so it needs no handling.

Both ELF classes and byte orders are read, though Linux modules for amd64 are ELF64
little-endian. A module tree is `lib/modules/<kernel version>/**` (or under `usr/`).
"""

from __future__ import annotations

import gzip
import heapq
import io
import lzma
import struct
import tarfile
from difflib import get_close_matches
from pathlib import Path, PurePosixPath
from forge.formats.common.compression import CompressionError, open_decompressed
from forge.formats.linux.errors import ModuleError

_XZ, _GZ, _ZST = b"\xfd7zXZ\x00", b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def _decompress(data: bytes) -> bytes:
    if data.startswith(_XZ):
        return lzma.decompress(data)
    if data.startswith(_GZ):
        return gzip.decompress(data)
    if data.startswith(_ZST):
        try:
            return open_decompressed(io.BytesIO(data), "a zstd-compressed module").read()
        except CompressionError as e:
            raise ModuleError(str(e)) from None
    return data


def _section(elf: bytes, wanted: str) -> bytes | None:
    if elf[:4] != b"\x7fELF" or elf[4] not in (1, 2) or elf[5] not in (1, 2):
        raise ModuleError("not an ELF file")
    end = "<" if elf[5] == 1 else ">"
    if elf[4] == 2:
        shoff, = struct.unpack_from(end + "Q", elf, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "3H", elf, 0x3A)
        shdr = end + "IIQQQQIIQQ"
    else:
        shoff, = struct.unpack_from(end + "I", elf, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "3H", elf, 0x2E)
        shdr = end + "IIIIIIIIII"
    try:
        def header(i: int) -> tuple:
            # (name, type, flags, addr, offset, size, link, ...): same order in both classes
            return struct.unpack_from(shdr, elf, shoff + i * shentsize)

        if shoff == 0:
            return None
        first = header(0)
        if shnum == 0:  # more than 0xff00 sections: the real count is in section 0
            shnum = first[5]
        if shstrndx == 0xFFFF:
            shstrndx = first[6]
        strtab = header(shstrndx)
        names = elf[strtab[4]:strtab[4] + strtab[5]]
        for i in range(shnum):
            h = header(i)
            name = names[h[0]:names.index(b"\0", h[0])].decode("ascii", "replace")
            if name == wanted:
                if h[1] == 8:  # SHT_NOBITS: occupies no bytes in the file
                    return b""
                return elf[h[4]:h[4] + h[5]]
    except (struct.error, ValueError, IndexError) as e:
        raise ModuleError(f"corrupt ELF section headers: {e}") from None
    return None


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The `.modinfo` of a module file's bytes (compressed or not); keys in file order."""
    raw = _section(_decompress(data), ".modinfo")
    if raw is None:
        raise ModuleError("no .modinfo section: not a kernel module")
    out: dict[str, list[str]] = {}
    for item in raw.split(b"\0"):
        if item:
            key, _, value = item.decode("utf-8", "replace").partition("=")
            out.setdefault(key, []).append(value)
    return out


def module_name(path: str | PurePosixPath, info: dict[str, list[str]]) -> str:
    if info.get("name"):
        return info["name"][0]
    base = PurePosixPath(path).name
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[:-len(suffix)]
            break
    return base.replace("-", "_")


def _depends(info: dict[str, list[str]]) -> list[str]:
    return [d.strip().replace("-", "_") for v in info.get("depends", []) for d in v.split(",")
            if d.strip()]


def _is_module(name: str) -> bool:
    return name.endswith(_SUFFIXES)


def _tree_key(parts: tuple[str, ...]) -> str | None:
    """The kernel version of a path under [usr/]lib/modules/<version>/, else None."""
    parts = tuple(p for p in parts if p not in ("", ".", "/"))
    if parts[:1] == ("usr",):
        parts = parts[1:]
    return parts[2] if len(parts) > 3 and parts[:2] == ("lib", "modules") else None


def _one_version(found: dict[str, dict], where: str) -> dict:
    if len(found) > 1:
        raise ModuleError(f"{where} holds modules of several kernels: {', '.join(sorted(found))}")
    return next(iter(found.values()), {})


def index_tree(root: Path) -> dict[str, tuple[Path, dict[str, list[str]]]]:
    """Every module under `root`'s `[usr/]lib/modules/<version>/`, by module name."""
    found: dict[str, dict] = {}
    for sub in ("lib/modules", "usr/lib/modules"):
        for path in sorted((Path(root) / sub).glob("*/**/*.ko*")):
            if _is_module(path.name) and path.is_file():
                info = modinfo(path.read_bytes())
                found.setdefault(path.relative_to(Path(root) / sub).parts[0], {})[
                    module_name(path, info)] = (path, info)
    return _one_version(found, str(root))


def index_tar(tf: tarfile.TarFile) -> dict[str, tuple[str, dict[str, list[str]]]]:
    """Every module in a tar of a root tree (a .deb's data.tar), by module name, read in
    archive order so that a compressed stream is never rewound."""
    found: dict[str, dict] = {}
    for m in tf:
        version = _tree_key(PurePosixPath(m.name).parts)
        if version and m.isfile() and _is_module(m.name):
            info = modinfo(tf.extractfile(m).read())
            found.setdefault(version, {})[module_name(m.name, info)] = (m.name, info)
    return _one_version(found, "archive")


def _unknown(name: str, modules: dict, needed_by: str | None) -> ModuleError:
    close = get_close_matches(name, sorted(modules), n=5, cutoff=0.6)
    msg = f"unknown kernel module {name!r}" + (f" (a dependency of {needed_by})" if needed_by else "")
    return ModuleError(msg + (f"; close names: {', '.join(close)}" if close else "; no close names"))


def load_order(modules: dict[str, dict[str, list[str]]], wanted: list[str]) -> list[str]:
    """`wanted` and everything they depend on, each after its dependencies.

    Deterministic: of the modules whose dependencies are all placed, the next one is the
    one needed by the earliest name in `wanted`, then the first by name. So the closure of
    `wanted[0]` loads before whatever only later names need.
    """
    wanted = [w.replace("-", "_") for w in wanted]
    rank: dict[str, int] = {}
    deps: dict[str, list[str]] = {}
    for i, root in enumerate(wanted):
        todo: list[tuple[str, str | None]] = [(root, None)]
        while todo:
            name, parent = todo.pop()
            if name not in modules:
                raise _unknown(name, modules, parent)
            if name in rank:
                continue
            rank[name] = i
            deps[name] = _depends(modules[name])
            todo += [(d, name) for d in deps[name]]
    users: dict[str, list[str]] = {n: [] for n in deps}
    missing = {n: len(set(ds)) for n, ds in deps.items()}
    for n, ds in deps.items():
        for d in set(ds):
            users[d].append(n)
    ready = [(rank[n], n) for n, c in missing.items() if c == 0]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        _, n = heapq.heappop(ready)
        out.append(n)
        for u in users[n]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, (rank[u], u))
    if len(out) < len(deps):
        raise ModuleError("kernel module dependency cycle: " + " -> ".join(_cycle(deps, set(out))))
    return out


def _cycle(deps: dict[str, list[str]], placed: set[str]) -> list[str]:
    """A cycle among the unplaced modules (each of them has an unplaced dependency)."""
    start = min(n for n in deps if n not in placed)
    path, seen = [start], {start: 0}
    while True:
        nxt = min(d for d in deps[path[-1]] if d not in placed)
        if nxt in seen:
            return path[seen[nxt]:] + [nxt]
        seen[nxt] = len(path)
        path.append(nxt)
