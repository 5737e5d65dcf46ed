"""Writing layer tarballs without touching the disk: `normalise` (rewrite one layer
reproducibly), `flatten` (merge layers with whiteouts into one tar) and
`layer_from_dir` (a layer from files on disk). The rules for names, whiteouts and
reproducibility are those of `forge.formats.image.layer_read`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from forge.formats.common import treepath
from forge.formats.image.errors import LayerError, UnsafeLayerError
from forge.formats.image.layer_read import Source, layer_errors, naming_layer, open_random
from forge.formats.image.spec import (OCI_LAYER, OCI_LAYER_GZIP, OPAQUE_WHITEOUT, WHITEOUT_PREFIX,
                                      XATTR_PREFIXES, LayerInfo)

# ---- merging and writing without touching the disk ---------------------------------

class _Data:
    """The bytes of one regular file; hardlinked names share one instance."""

    def __init__(self, size: int, open_: Callable[[], BinaryIO]):
        self.size, self.open = size, open_


@dataclass
class _Entry:
    info: tarfile.TarInfo
    data: _Data | None = None


def _clean_info(m: tarfile.TarInfo, mtime: int | None) -> tarfile.TarInfo:
    t = tarfile.TarInfo()
    t.type = tarfile.REGTYPE if m.type in (tarfile.AREGTYPE, tarfile.CONTTYPE) else m.type
    t.mode, t.uid, t.gid = m.mode & 0o7777, m.uid, m.gid
    t.mtime = int(m.mtime if mtime is None else mtime)
    t.linkname, t.devmajor, t.devminor = m.linkname, m.devmajor, m.devminor
    t.pax_headers = {k: v for k, v in m.pax_headers.items() if k.startswith(XATTR_PREFIXES)}
    return t


def _tar_data(tf: tarfile.TarFile, m: tarfile.TarInfo) -> _Data:
    if m.size < 0:  # a PAX `size` record may say anything
        raise LayerError(f"{m.name!r}: its header gives a negative size ({m.size})")
    return _Data(m.size, lambda: tf.extractfile(m))


class _HashWriter:
    def __init__(self, out: BinaryIO):
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        self.out.write(b)
        return len(b)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.out.flush()


def _write_tar(entries: dict[str, _Entry], out: BinaryIO, *, compress: bool) -> LayerInfo:
    stored = _HashWriter(out)
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=stored, compresslevel=6, mtime=0) \
        if compress else None
    raw = _HashWriter(gz or stored)
    first_name: dict[int, str] = {}
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(entries, key=treepath.tree_order):
            e = entries[name]
            info = e.info
            info.name, info.uname, info.gname = name, "", ""
            if e.data is not None and id(e.data) in first_name:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, first_name[id(e.data)], 0
                tf.addfile(info)
            elif e.data is not None:
                first_name[id(e.data)] = name
                info.type, info.linkname, info.size = tarfile.REGTYPE, "", e.data.size
                with e.data.open() as f:
                    tf.addfile(info, f)
            else:
                info.size = 0
                tf.addfile(info)
    if gz is not None:
        gz.close()  # writes the trailer; leaves `out` open
    return LayerInfo(digest=f"sha256:{stored.sha.hexdigest()}", size=stored.size,
                     diff_id=f"sha256:{raw.sha.hexdigest()}",
                     media_type=OCI_LAYER_GZIP if compress else OCI_LAYER)


@layer_errors
def normalise(in_fileobj: Source, out_fileobj: BinaryIO, *, mtime: int,
              compress: bool) -> LayerInfo:
    """Rewrite a layer reproducibly (see the module docstring); whiteouts are kept."""
    keep: list = []
    try:
        with naming_layer(in_fileobj):
            return _normalise(open_random(in_fileobj, keep), out_fileobj, mtime, compress)
    finally:
        for obj in reversed(keep):
            obj.close()


def _normalise(tf: tarfile.TarFile, out_fileobj: BinaryIO, mtime: int, compress: bool) -> LayerInfo:
    entries: dict[str, _Entry] = {}
    for m in tf:
        name = "/".join(treepath.parts(m.name, m.name))
        if not name:
            continue
        e = _Entry(_clean_info(m, mtime))
        if m.isreg():
            e.data = _tar_data(tf, m)
        elif m.islnk():
            target = entries.get("/".join(treepath.parts(m.linkname, m.name)))
            if target is not None and target.data is not None:
                e = _Entry(_clean_info(target.info, mtime), target.data)
            else:  # links to a lower layer's file: keep as a link
                e.info.linkname = "/".join(treepath.parts(m.linkname, m.name))
        entries[name] = e
    return _write_tar(entries, out_fileobj, compress=compress)


class _Merger:
    """Applies layers to an in-memory index exactly as layer_read.Extractor applies them to disk."""

    def __init__(self, implicit_mtime: int):
        self.index: dict[str, _Entry] = {}
        self.implicit_mtime = implicit_mtime

    def readlink(self, rel: str) -> str | None:
        e = self.index.get(rel)
        return e.info.linkname if e is not None and e.info.issym() else None

    def drop(self, rel: str, keep: set[str] | None = None, self_too: bool = True) -> None:
        for k in [k for k in self.index if treepath.is_under(k, rel) and (self_too or k != rel)]:
            if keep is None or k not in keep:
                del self.index[k]

    def layer(self, tf: tarfile.TarFile, mtime: int | None) -> None:
        written: set[str] = set()
        for m in tf:
            parts = treepath.parts(m.name, m.name)
            if not parts:
                continue
            parent = "/".join(treepath.resolve(parts[:-1], self.readlink, m.name))
            base = parts[-1]
            rel = f"{parent}/{base}" if parent else base
            if base == OPAQUE_WHITEOUT:
                self._mkparents(parent, m.name, written)
                self.drop(parent, keep=written, self_too=False)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                gone = rel[:-len(base)] + base[len(WHITEOUT_PREFIX):]
                if not base.startswith(OPAQUE_WHITEOUT[:8]) and gone not in written:
                    self.drop(gone)
                continue
            self._mkparents(parent, m.name, written)
            e = _Entry(_clean_info(m, mtime))
            old = self.index.get(rel)
            if m.isdir():
                if old is None or not old.info.isdir():
                    self.drop(rel)
            else:
                self.drop(rel)
            if m.isreg():
                e.data = _tar_data(tf, m)
            elif m.issym() and treepath.symlink_escapes(parent.split("/") if parent else [], m.linkname):
                raise UnsafeLayerError(
                    f"{m.name!r}: symlink target {m.linkname!r} points outside the root")
            elif m.islnk():
                tparts = treepath.parts(m.linkname, m.name)
                tparent = treepath.resolve(tparts[:-1], self.readlink, m.name)
                target = self.index.get("/".join(tparent + tparts[-1:]))
                if target is None or target.info.isdir():
                    raise UnsafeLayerError(f"{m.name!r}: hardlink target {m.linkname!r} is not "
                                           "a file already present inside the root")
                e = _Entry(_clean_info(target.info, None), target.data)
            self.index[rel] = e
            written.update(treepath.prefixes(rel))

    def _mkparents(self, parent: str, member: str, written: set[str]) -> None:
        cur = ""
        for comp in parent.split("/") if parent else []:
            cur = f"{cur}/{comp}" if cur else comp
            e = self.index.get(cur)
            if e is None:
                info = tarfile.TarInfo()
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, self.implicit_mtime
                self.index[cur] = _Entry(info)
            elif not e.info.isdir():
                raise UnsafeLayerError(f"{member!r}: parent {cur!r} is not a directory")


@layer_errors
def flatten(layer_paths: Iterable[Source], out_fileobj: BinaryIO, *, mtime: int | None = None,
            compress: bool = False) -> LayerInfo:
    """Merge layers bottom to top into one sorted tar, without extracting anything.

    Whiteouts are applied (and not written), later layers override earlier ones, device
    nodes stay as headers. `mtime` set on every entry, or None to keep each entry's own
    (directories implied by a path but never listed get 0).
    """
    keep: list = []
    try:
        merger = _Merger(mtime or 0)
        for layer in layer_paths:
            with naming_layer(layer):
                merger.layer(open_random(layer, keep), mtime)
        return _write_tar(merger.index, out_fileobj, compress=compress)
    finally:
        for obj in reversed(keep):
            obj.close()


def _disk_entry(path: str, st: os.stat_result, inodes: dict, uid: int, gid: int,
                mtime: int) -> _Entry | None:
    """The entry of one file on disk (st: its lstat); files hardlinked together share one
    `_Data` through `inodes`. None for what a layer cannot hold (sockets)."""
    info = tarfile.TarInfo()
    info.mode, info.uid, info.gid, info.mtime = stat.S_IMODE(st.st_mode), uid, gid, mtime
    e = _Entry(info)
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino)
        e.data = inodes.get(key) or _Data(st.st_size, lambda p=path: open(p, "rb"))
        inodes[key] = e.data
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    else:
        return None
    return e


def _copied(rel: str, is_dir: bool, under: str) -> bool:
    under = under.strip("/")
    if not under:
        return True
    return rel.startswith(under + "/") or (rel == under and not is_dir)


@layer_errors
def layer_from_dir(src_dir: Path, out_fileobj: BinaryIO, *, prefix: str = "", uid: int = 0,
                   gid: int = 0, mtime: int, compress: bool = True,
                   mode_override: int | None = None, override_under: str = "") -> LayerInfo:
    """A reproducible layer holding the tree under `src_dir`, placed under `prefix`.

    Ownership comes from `uid`/`gid`, never from the host; `mode_override` (like
    `COPY --chmod`) replaces the mode of files and directories; with `override_under`
    (the COPY destination), only of the file of that name or what lies below it, so the
    parent directories a COPY creates keep 0755, as BuildKit makes them. Neither `src_dir` itself
    nor the directories of `prefix` get entries, so the layer never changes the mode of
    a directory that a lower layer owns (such as /tmp). Symlinks are stored, not followed;
    files hardlinked together stay hardlinked; sockets are left out.
    """
    src_dir = Path(src_dir)
    base = "/".join(treepath.parts(prefix, prefix))
    entries: dict[str, _Entry] = {}
    inodes: dict[tuple[int, int], _Data] = {}
    for top, dirnames, filenames in os.walk(src_dir):
        dirnames.sort()
        for name in dirnames + sorted(filenames):
            path = os.path.join(top, name)
            rel = os.path.relpath(path, src_dir).replace(os.sep, "/")
            st = os.lstat(path)
            e = _disk_entry(path, st, inodes, uid, gid, mtime)
            if e is None:
                continue
            info = e.info
            if mode_override is not None and (info.isdir() or e.data is not None) and \
                    _copied(rel, info.isdir(), override_under):
                info.mode = mode_override
            entries[f"{base}/{rel}" if base else rel] = e
    return _write_tar(entries, out_fileobj, compress=compress)


OVERLAY_OPAQUE = "trusted.overlay.opaque"  # overlayfs marks a directory that hides what is below
CAPABILITY = "security.capability"  # the one extended attribute Docker's layer tars carry


@layer_errors
def layer_from_overlay_diff(diff_dir: Path, out_fileobj: BinaryIO, *, mtime: int,
                            compress: bool = True) -> LayerInfo:
    """The layer an overlayfs upper directory holds (a Docker engine's `overlay2/<id>/diff`),
    written as `normalise` writes the engine's own tar of it: ownership and modes as on
    disk, overlay whiteouts (0/0 character devices, opaque directories) as `.wh.` entries
    the way Docker converts them, `security.capability` kept, sockets left out."""
    entries: dict[str, _Entry] = {}
    inodes: dict[tuple[int, int], _Data] = {}
    for top, dirnames, filenames in os.walk(diff_dir):
        for name in dirnames + filenames:
            path = os.path.join(top, name)
            rel = os.path.relpath(path, diff_dir).replace(os.sep, "/")
            st = os.lstat(path)
            e = _disk_entry(path, st, inodes, st.st_uid, st.st_gid, mtime)
            if e is None:
                continue
            info = e.info
            if info.isdir() and _xattr(path, OVERLAY_OPAQUE) == b"y":
                wo = tarfile.TarInfo()
                wo.type, wo.mode, wo.uid, wo.gid, wo.mtime = tarfile.REGTYPE, \
                    info.mode & 0o777, st.st_uid, st.st_gid, mtime
                entries[f"{rel}/{OPAQUE_WHITEOUT}"] = _Entry(wo)
            elif info.ischr() and st.st_rdev == 0:  # an overlay whiteout
                info.type, info.mode, info.devmajor, info.devminor = tarfile.REGTYPE, 0o600, 0, 0
                parent, _, base = rel.rpartition("/")
                rel = f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else WHITEOUT_PREFIX + base
            cap = _xattr(path, CAPABILITY) if not stat.S_ISLNK(st.st_mode) else None
            if cap is not None:  # decoded as tarfile decodes it when reading, for `normalise`'s bytes
                info.pax_headers = {f"SCHILY.xattr.{CAPABILITY}":
                                    cap.decode("utf-8", "surrogateescape")}
            entries[rel] = e
    return _write_tar(entries, out_fileobj, compress=compress)


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:  # ENODATA, or a filesystem without extended attributes
        return None
