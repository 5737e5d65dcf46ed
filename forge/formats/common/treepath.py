"""Paths inside a tree that someone else wrote (an image layer, a remote directory).

Names are split into components with `.` and empty parts dropped; a `..` component is
refused, since it could only mean escaping the root. Symlinks are followed the way a
chroot would: an absolute target restarts at the tree's root and `..` stops there, so a
resolved path never leaves the tree, and a relative symlink target that would climb above
the root is an escape the writer of the tree must not be able to make.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from forge.formats.errors import FormatError

MAX_SYMLINK_HOPS = 40  # Linux's own limit (MAXSYMLINKS)


class UnsafePathError(FormatError):
    """A path would escape its root, or cannot be resolved safely."""


def parts(name: str, member: str) -> list[str]:
    """`name`'s components; `member` names it in the error (a tar member, an entry)."""
    comps = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in comps:
        raise UnsafePathError(f"{member!r}: a '..' component would escape the root")
    return comps


def resolve(comps: list[str], readlink: Callable[[str], str | None], member: str) -> list[str]:
    """Follow symlinks met in `comps` as if the root were `/` (`..` stops at the root).

    `readlink(path)` gives the target of the symlink at a root-relative path, or None.
    """
    done: list[str] = []
    todo = list(comps)
    hops = 0
    while todo:
        comp = todo.pop(0)
        if comp in ("", "."):
            continue
        if comp == "..":
            if done:
                done.pop()
            continue
        target = readlink("/".join(done + [comp]))
        if target is None:
            done.append(comp)
            continue
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            raise UnsafePathError(f"{member!r}: too many levels of symbolic links")
        if target.startswith("/"):
            done = []
        todo = target.split("/") + todo
    return done


def resolve_on_disk(root: Path, rel: str) -> list[str]:
    """`rel`'s components with the symlinks unpacked under `root` followed as if `root`
    were `/` (components not on disk are taken as plain directories)."""
    def readlink(p: str) -> str | None:
        full = root / p
        return os.readlink(full) if full.is_symlink() else None
    return resolve(parts(rel, rel), readlink, rel)


def symlink_escapes(where: list[str], target: str) -> bool:
    """Whether a relative `target`, read from the directory `where`, climbs above the root."""
    if target.startswith("/"):
        return False  # resolved from the tree's root when it is used
    depth = len(where)
    for comp in target.split("/"):
        if comp == "..":
            depth -= 1
            if depth < 0:
                return True
        elif comp not in ("", "."):
            depth += 1
    return False


def is_under(path: str, root: str) -> bool:
    """Whether the root-relative `path` is `root` or inside it (`""` is the whole tree)."""
    return root == "" or path == root or path.startswith(root + "/")


def tree_order(path: str) -> list[str]:
    """Sort key putting a directory just before its contents (component-wise order)."""
    return path.split("/")


def prefixes(rel: str) -> list[str]:
    """`a`, `a/b`, `a/b/c` for `a/b/c`: the path and every directory above it."""
    comps = rel.split("/")
    return ["/".join(comps[:i]) for i in range(1, len(comps) + 1)]
