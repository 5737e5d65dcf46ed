"""Image layer tarballs: safe extraction, merging and reproducible rewriting.

An image layer (OCI image-spec `layer.md`) is a tar archive, plain or compressed with gzip
or zstd (several members or frames included: forge.formats.common.compression), holding
the changes a layer makes to the filesystem below it. Deletions are written as *whiteouts*: an empty entry
`dir/.wh.<name>` removes `dir/<name>` (and everything under it) as earlier layers left
it, and `dir/.wh..wh..opq` makes `dir` opaque: everything earlier layers put in it is
hidden, while entries of the same layer stay. Whiteouts never affect their own layer.

Member names are relative to the image root; a leading `/` or `./` is noise and is
dropped. A name with a `..` component is an attack and is refused, as are symlinks whose
relative target climbs above the root, and hardlinks to anything that is not already
inside the tree. Absolute symlink targets are kept as they are: they mean "from the image
root" when the image runs. Paths are resolved the way a chroot would: a symlink met in a
parent component is followed *inside* the destination, so nothing is ever written outside
it, and device nodes are never created on the host.

Archives written here are reproducible: entries sorted by path components (a directory
just before its contents), one fixed mtime, no user or group names, PAX format with only
the extended headers that carry meaning (long names, `SCHILY.xattr.*`), and gzip at level
6 without file name or timestamp. Hardlinked files are written once, as the first path in
that order, the other names linking to it.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from forge.formats.common.compression import CompressionError, open_decompressed
from forge.formats.common import treepath
from forge.formats.common.treepath import UnsafePathError
from forge.formats.image.errors import LayerError, UnsafeLayerError
from forge.formats.image.spec import OPAQUE_WHITEOUT, WHITEOUT_PREFIX, XATTR_PREFIXES

_CHUNK = 1 << 20

Source = BinaryIO | str | os.PathLike


def layer_errors(fn):
    """Path escapes found by the shared path helpers surface as this domain's
    `UnsafeLayerError`, and undecodable layer data as its `LayerError`, so a caller of
    the layer functions catches this domain's errors only."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UnsafeLayerError:
            raise
        except UnsafePathError as e:
            raise UnsafeLayerError(str(e)) from None
        except CompressionError as e:
            raise LayerError(str(e)) from None
    return wrapper


def layer_name(src: Source) -> str:
    """How a message names a layer: its digest when it is a layout's blob, else its path."""
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        return f"{p.parent.name}:{p.name}" if p.parent.parent.name == "blobs" else str(p)
    return str(getattr(src, "name", "(a stream)"))


# What a corrupt or cut-short layer raises from below tarfile: the gzip decoder (a bad
# header or CRC, a bad deflate stream) and the end of the data.
_CORRUPT = (tarfile.TarError, CompressionError, EOFError, zlib.error, gzip.BadGzipFile)


@contextlib.contextmanager
def naming_layer(src: Source):
    """Errors while reading the layer `src` say which layer it is (one image has many)."""
    try:
        yield
    except UnsafePathError as e:
        raise UnsafeLayerError(f"layer {layer_name(src)}: {e}") from None
    except _CORRUPT as e:
        raise LayerError(f"layer {layer_name(src)} is not a tar archive forge can read: "
                         f"{e or type(e).__name__}") from None
    except ValueError as e:
        if not _raised_in_tarfile(e):
            raise
        # tarfile reads a PAX header's numbers with a bare int() (size=abc, a sparse map)
        raise LayerError(f"layer {layer_name(src)} has a PAX header tarfile cannot read: "
                         f"{e}") from None


def _raised_in_tarfile(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename == tarfile.__file__


def _open_source(src: Source) -> tuple[BinaryIO, bool]:
    if isinstance(src, (str, os.PathLike)):
        return open(src, "rb"), True
    return src, False


def open_random(src: Source, keep: list) -> tarfile.TarFile:
    """A TarFile allowing `extractfile` in any order; compressed input is spooled."""
    f, owned = _open_source(src)
    if owned:
        keep.append(f)
    stream = open_decompressed(f)
    if stream is not f or not f.seekable():
        spool = tempfile.TemporaryFile()
        keep.append(spool)
        shutil.copyfileobj(stream, spool, _CHUNK)
        spool.seek(0)
        stream = spool
    tf = tarfile.open(fileobj=stream, mode="r:")
    keep.append(tf)
    return tf


# ---- extraction to disk -------------------------------------------------------------

class Extractor:
    def __init__(self, dest: Path, strip_devices: bool,
                 include: Callable[[str], bool] | None = None):
        self.dest = os.path.realpath(dest)
        self.strip_devices = strip_devices
        self.include = include
        self.root = os.geteuid() == 0
        self.skipped: list[str] = []

    def host(self, rel: str) -> str:
        return os.path.join(self.dest, rel) if rel else self.dest

    def readlink(self, rel: str) -> str | None:
        # Every prefix of `rel` was already resolved to a real directory, so lstat
        # never traverses a symlink on the host.
        p = self.host(rel)
        try:
            return os.readlink(p) if stat.S_ISLNK(os.lstat(p).st_mode) else None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def layer(self, src: Source) -> None:
        f, owned = _open_source(src)
        try:
            with naming_layer(src), tarfile.open(fileobj=open_decompressed(f), mode="r|") as tf:
                self._members(tf)
        finally:
            if owned:
                f.close()

    def _members(self, tf: tarfile.TarFile) -> None:
        written: set[str] = set()
        dirs: dict[str, tarfile.TarInfo] = {}
        for m in tf:
            parts = treepath.parts(m.name, m.name)
            if not parts:
                continue  # the root itself: its attributes belong to the caller's dest
            parent = "/".join(treepath.resolve(parts[:-1], self.readlink, m.name))
            base = parts[-1]
            if base.startswith(WHITEOUT_PREFIX):
                self._whiteout(parent, base, written, m.name)
                continue
            rel = f"{parent}/{base}" if parent else base
            if self.include is not None and not self.include(rel):
                continue
            self._mkparents(parent, m.name)
            if m.ischr() or m.isblk() or m.isfifo():
                if self.strip_devices:
                    self.skipped.append(m.name)
                    continue
                if not m.isfifo():
                    raise UnsafeLayerError(f"{m.name!r}: device nodes are never created")
            elif not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
                self.skipped.append(m.name)
                continue
            self._write(tf, m, rel, parent)
            if m.isdir():
                dirs[rel] = m
            written.update(treepath.prefixes(rel))
        # Directories last, deepest first: writing into them moved their mtimes, and a
        # read-only mode would have blocked the writes.
        for rel in sorted(dirs, key=treepath.tree_order, reverse=True):
            p = self.host(rel)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, dirs[rel].mode & 0o7777)
                os.utime(p, (dirs[rel].mtime, dirs[rel].mtime))

    def _mkparents(self, parent: str, member: str) -> None:
        cur = ""
        for comp in parent.split("/") if parent else []:
            cur = f"{cur}/{comp}" if cur else comp
            p = self.host(cur)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                os.mkdir(p, 0o755)
                os.chmod(p, 0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeLayerError(f"{member!r}: parent {cur!r} is not a directory")

    def _remove(self, rel: str, keep_dir: bool = False) -> None:
        p = self.host(rel)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not keep_dir:
                shutil.rmtree(p)
        else:
            os.unlink(p)

    def _whiteout(self, parent: str, base: str, written: set[str], member: str) -> None:
        if base == OPAQUE_WHITEOUT:
            self._mkparents(parent, member)
            self._clear(parent, written)
        elif not base.startswith(OPAQUE_WHITEOUT[:8]):  # other .wh..wh.* are aufs bookkeeping
            name = base[len(WHITEOUT_PREFIX):]
            if name in ("", ".", ".."):  # `.wh...` would delete dest/.. itself
                raise UnsafeLayerError(f"{member!r}: a whiteout must name an entry, not {name!r}")
            rel = f"{parent}/{name}" if parent else name
            if rel not in written:
                self._remove(rel)

    def _clear(self, rel: str, written: set[str]) -> None:
        for name in os.listdir(self.host(rel)):
            child = f"{rel}/{name}" if rel else name
            if child not in written:
                self._remove(child)
            elif os.path.isdir(self.host(child)) and not os.path.islink(self.host(child)):
                self._clear(child, written)

    def _write(self, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str, parent: str) -> None:
        p = self.host(rel)
        if m.issym() and treepath.symlink_escapes(parent.split("/") if parent else [], m.linkname):
            raise UnsafeLayerError(
                f"{m.name!r}: symlink target {m.linkname!r} points outside the root")
        if m.islnk():
            self._hardlink(m, p)
            return  # a hardlink shares its target's inode and metadata
        self._remove(rel, keep_dir=m.isdir())
        if m.isdir():
            if not os.path.isdir(p):
                os.mkdir(p, 0o700)
        elif m.issym():
            if not m.linkname:  # no filesystem can hold one
                raise UnsafeLayerError(f"{m.name!r}: a symlink with an empty target")
            os.symlink(m.linkname, p)
        elif m.isfifo():
            os.mkfifo(p, 0o600)
        else:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(tf.extractfile(m), out, _CHUNK)
        self._attributes(m, p)

    def _hardlink(self, m: tarfile.TarInfo, p: str) -> None:
        tparts = treepath.parts(m.linkname, m.name)
        tparent = treepath.resolve(tparts[:-1], self.readlink, m.name)
        target = self.host("/".join(tparent + tparts[-1:]))
        if not tparts or not os.path.lexists(target) or \
                os.path.isdir(target) and not os.path.islink(target):
            raise UnsafeLayerError(f"{m.name!r}: hardlink target {m.linkname!r} is not "
                                   "a file already extracted inside the root")
        if os.path.lexists(p) and os.path.samestat(os.lstat(p), os.lstat(target)):
            return
        self._remove(os.path.relpath(p, self.dest))
        os.link(target, p, follow_symlinks=False)

    def _attributes(self, m: tarfile.TarInfo, p: str) -> None:
        if self.root:
            os.lchown(p, m.uid, m.gid)
            for key, value in m.pax_headers.items():
                for prefix in XATTR_PREFIXES:
                    if key.startswith(prefix):
                        try:
                            os.setxattr(p, key[len(prefix):],
                                        value.encode("utf-8", "surrogateescape"),
                                        follow_symlinks=False)
                        except OSError:
                            pass  # the host filesystem may not support this namespace
        if m.issym():
            os.utime(p, (m.mtime, m.mtime), follow_symlinks=False)
        elif not m.isdir():
            # After chown, which clears setuid/setgid bits.
            os.chmod(p, m.mode & 0o7777)
            os.utime(p, (m.mtime, m.mtime))


@layer_errors
def safe_extract(src: Source, dest: Path, *, strip_devices: bool = True,
                 include: Callable[[str], bool] | None = None) -> list[str]:
    """Extract one layer into `dest`, applying its whiteouts to what is already there.

    Returns the names of members not created: device nodes and fifos (when
    `strip_devices`; otherwise fifos are made and a device node is an error) and entry
    types with no meaning on disk. Raises UnsafeLayerError naming the member.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    ex = Extractor(dest, strip_devices, include)
    ex.layer(src)
    return ex.skipped


@layer_errors
def apply_layers(layer_paths: Iterable[Source], dest: Path, *, strip_devices: bool = True,
                 include: Callable[[str], bool] | None = None) -> list[str]:
    """Extract layers bottom to top into `dest`; returns every skipped member.
    `include(path)` (resolved, root-relative) limits what is written; the caller must
    admit the ancestors of what it wants (see `resolve_paths`)."""
    skipped: list[str] = []
    for layer in layer_paths:  # safe_extract names the layer in its errors
        skipped += safe_extract(layer, dest, strip_devices=strip_devices, include=include)
    return skipped


def resolve_paths(layer_paths: Iterable[Source], paths: list[str]) -> dict[str, str | None]:
    """Where each image path really is once the layers are merged: symlinks in every
    component followed inside the image root, as a container would. None: absent.

    Reads only the tar headers, so copying a few files out of a large image (COPY
    --from) need not unpack all of it: extract with `apply_layers(include=...)` below
    the returned paths afterwards.
    """
    kinds: dict[str, str] = {}  # resolved path -> "d", "f" or "l:<target>"

    def readlink(rel: str) -> str | None:
        k = kinds.get(rel)
        return k[2:] if k and k.startswith("l:") else None

    for src in layer_paths:
        f, owned = _open_source(src)
        try:
            written: set[str] = set()
            with naming_layer(src), tarfile.open(fileobj=open_decompressed(f), mode="r|") as tf:
                for m in tf:
                    parts = treepath.parts(m.name, m.name)
                    if not parts:
                        continue
                    parent = "/".join(treepath.resolve(parts[:-1], readlink, m.name))
                    base = parts[-1]
                    if base.startswith(WHITEOUT_PREFIX):
                        gone = parent if base == OPAQUE_WHITEOUT else \
                            (f"{parent}/{base[4:]}" if parent else base[4:])
                        under = f"{gone}/" if gone else ""
                        for k in [k for k in kinds if ((k == gone and base != OPAQUE_WHITEOUT)
                                                       or k.startswith(under)) and k not in written]:
                            del kinds[k]
                        continue
                    rel = f"{parent}/{base}" if parent else base
                    kinds[rel] = "d" if m.isdir() else f"l:{m.linkname}" if m.issym() else "f"
                    written.add(rel)
        finally:
            if owned:
                f.close()
    out: dict[str, str | None] = {}
    for p in paths:
        parts = [x for x in p.split("/") if x not in ("", ".")]
        try:
            real = "/".join(treepath.resolve(parts, readlink, p)) if parts else ""
        except UnsafePathError:
            real = None
        out[p] = real if real == "" or (real is not None and real in kinds) else None
    return out
