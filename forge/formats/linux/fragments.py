"""Root-filesystem fragments: reproducible tars that unpack at `/` of an OS image.

An OS image's root filesystem is assembled from independent fragments (the kernel's
modules, each init image, one OCI bundle per onboot/onshutdown/service entry, the files,
the volumes), each cached on its own; the initrd is one cpio segment per fragment and the
`tar` format their concatenation. A fragment is a plain POSIX (pax) tar whose every entry
has the fixed `mtime`, numeric ownership and no user names, and which lists each parent
directory before its children, because the kernel creates no missing parent when it
unpacks an initramfs.

`FragmentWriter` writes entries in the caller's order; `copy_tree` copies another tar
(a flattened image) under a prefix, dropping and replacing paths the way LinuxKit does
for every image it puts in an OS.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from typing import BinaryIO, Iterable


def _norm(path: str) -> str:
    return posixpath.normpath("/" + path).lstrip("/")  # "./x", "/x", "x/" -> "x"; "." -> ""


class FragmentWriter:
    """A tar writer for fragments: fixed mtime, parents first, each path once."""

    def __init__(self, fileobj: BinaryIO, *, mtime: int):
        self.tf = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT)
        self.mtime = mtime
        self.seen: set[str] = set()

    def __enter__(self) -> "FragmentWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.tf.close()

    def _info(self, path: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(path)
        ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = kind, mode, uid, gid, self.mtime
        ti.uname = ti.gname = ""
        return ti

    def parents(self, path: str) -> None:
        parts = _norm(path).split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.seen:
                self.seen.add(d)
                self.tf.addfile(self._info(d, tarfile.DIRTYPE, 0o755))

    def directory(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        path = _norm(path)
        self.parents(path)
        if path not in self.seen:
            self.seen.add(path)
            self.tf.addfile(self._info(path, tarfile.DIRTYPE, mode, uid, gid))

    def file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        path = _norm(path)
        self.parents(path)
        self.seen.add(path)
        ti = self._info(path, tarfile.REGTYPE, mode, uid, gid)
        ti.size = len(data)
        self.tf.addfile(ti, io.BytesIO(data))

    def symlink(self, path: str, target: str, uid: int = 0, gid: int = 0) -> None:
        path = _norm(path)
        self.parents(path)
        self.seen.add(path)
        ti = self._info(path, tarfile.SYMTYPE, 0o777, uid, gid)
        ti.linkname = target
        self.tf.addfile(ti)

    def copy_tree(self, src: tarfile.TarFile, prefix: str = "", *, drop: Iterable[str] = (),
                  replace: dict[str, bytes] | None = None, extra_dirs: Iterable[str] = ()) -> None:
        """Copy `src`'s members under `prefix`, keeping modes and numeric ownership.
        `drop` removes paths and everything below; `replace` rewrites a path the tree has
        as a regular file (a symlink there too, as LinuxKit does); `extra_dirs` are
        directories made when the tree lacks them (mount points)."""
        prefix = _norm(prefix)
        gone = {_norm(d) for d in drop}
        new = {_norm(k): v for k, v in (replace or {}).items()}
        if prefix:
            self.directory(prefix)
        have: set[str] = set()
        for m in src:
            name = _norm(m.name)
            if not name or any(name == g or name.startswith(g + "/") for g in gone):
                continue
            have.add(name)
            out = f"{prefix}/{name}" if prefix else name
            if name in new:
                self.file(out, new[name], 0o644, m.uid, m.gid)
                continue
            if m.isdir() and out in self.seen:
                continue  # a directory another fragment (or a parent) already made
            ti = self._info(out, m.type, m.mode, m.uid, m.gid)
            if m.islnk():
                link = _norm(m.linkname)
                if any(link == g or link.startswith(g + "/") for g in gone) or link in new:
                    continue  # its target was dropped or rewritten: LinuxKit loses it too
                ti.linkname = f"{prefix}/{link}" if prefix else link
            elif m.issym():
                ti.linkname = m.linkname
            elif m.ischr() or m.isblk():
                ti.devmajor, ti.devminor = m.devmajor, m.devminor
            self.parents(out)
            self.seen.add(out)
            if m.isreg():
                ti.size = m.size
                self.tf.addfile(ti, src.extractfile(m))
            else:
                self.tf.addfile(ti)
        for d in extra_dirs:
            if _norm(d) not in have:
                self.directory(f"{prefix}/{d}" if prefix else d)
