"""What a dynamically linked ELF program needs to run: its loader (PT_INTERP) and its
libraries (DT_NEEDED), followed through the libraries' own needs. The boot initrd runs
Debian's dmsetup this way, with no ld.so.cache: every library sits in one directory.
"""

from __future__ import annotations

import struct
from typing import Callable

from forge.formats.linux.errors import BootInitrdError

__all__ = ["interpreter", "needed", "closure"]

_PT_LOAD, _PT_DYNAMIC, _PT_INTERP = 1, 2, 3
_DT_NEEDED, _DT_STRTAB = 1, 5


def _header(elf: bytes, what: str):
    if elf[:4] != b"\x7fELF" or len(elf) < 64:
        raise BootInitrdError(f"{what} is not an ELF file")
    wide, order = elf[4] == 2, "<" if elf[5] == 1 else ">"
    if wide:
        phoff, = struct.unpack_from(order + "Q", elf, 32)
        phentsize, phnum = struct.unpack_from(order + "HH", elf, 54)
        fmt = order + "IIQQQQQQ"  # type, flags, offset, vaddr, paddr, filesz, memsz, align
    else:
        phoff, = struct.unpack_from(order + "I", elf, 28)
        phentsize, phnum = struct.unpack_from(order + "HH", elf, 42)
        fmt = order + "IIIIIIII"  # type, offset, vaddr, paddr, filesz, memsz, flags, align
    heads = []
    for k in range(phnum):
        off = phoff + k * phentsize
        if off + struct.calcsize(fmt) > len(elf):
            raise BootInitrdError(f"{what}: truncated ELF program headers")
        v = struct.unpack_from(fmt, elf, off)
        # (type, offset, vaddr, filesz) whichever the class
        heads.append((v[0], v[2], v[3], v[5]) if wide else (v[0], v[1], v[2], v[4]))
    return wide, order, heads


def interpreter(elf: bytes, what: str = "the program") -> str | None:
    """The dynamic loader an executable names, or None (static)."""
    _, _, heads = _header(elf, what)
    for kind, off, _, size in heads:
        if kind == _PT_INTERP:
            return elf[off:off + size].split(b"\0", 1)[0].decode()
    return None


def needed(elf: bytes, what: str = "the program") -> list[str]:
    """The DT_NEEDED sonames, in order."""
    wide, order, heads = _header(elf, what)
    dyn = next(((off, size) for kind, off, _, size in heads if kind == _PT_DYNAMIC), None)
    if dyn is None:
        return []
    entry = order + ("qQ" if wide else "iI")
    step = struct.calcsize(entry)
    tags = [struct.unpack_from(entry, elf, o) for o in range(dyn[0], dyn[0] + dyn[1], step)]
    strtab = next((v for t, v in tags if t == _DT_STRTAB), None)
    if strtab is None:
        raise BootInitrdError(f"{what}: its dynamic section has no string table")
    base = next((off + strtab - vaddr for kind, off, vaddr, size in heads
                 if kind == _PT_LOAD and vaddr <= strtab < vaddr + size), None)
    if base is None:
        raise BootInitrdError(f"{what}: its string table lies outside the file")
    names = []
    for t, v in tags:
        if t == _DT_NEEDED:
            names.append(elf[base + v:elf.index(b"\0", base + v)].decode())
    return names


def closure(program: bytes, find: Callable[[str], bytes | None],
            what: str = "the program") -> dict[str, bytes]:
    """soname -> bytes of every library `program` needs, the loader included (under its
    file name); `find` looks a soname up. A library nobody has is a BootInitrdError."""
    found: dict[str, bytes] = {}
    loader = interpreter(program, what)
    todo = [(n, what) for n in needed(program, what)]
    if loader:
        todo.insert(0, (loader.rsplit("/", 1)[-1], what))
    while todo:
        name, by = todo.pop(0)
        if name in found:
            continue
        blob = find(name)
        if blob is None:
            raise BootInitrdError(f"{by} needs {name}, which none of the given packages holds")
        found[name] = blob
        todo += [(n, name) for n in needed(blob, name)]
    return found
