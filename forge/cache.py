"""The local cache: content-addressed blobs plus action-cache records.

Layout of a cache directory (shared safely by several forge processes):

    cas/<2 hex>/<xxh3-128 hex>[.x]   blobs, read-only; `.x` marks an executable copy
    ac/                              diskcache (SQLite): action key -> record
    tmp/                             sandboxes and partial writes (same filesystem,
                                     so a finished blob is renamed, never copied)
    workspaces/<id>/                 one workspace's records (see forge.records)

A blob is written to tmp/ and renamed into place, so readers never see a torn
file. An action-cache record is written only after all its blobs exist, so a
record never points at a blob that was not written. A blob that is missing or
whose content no longer matches its name turns a hit into a miss with a warning.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from forge.digest import digest_file
from forge.leftovers import force_rmtree, owner

RECORD_VERSION = 2


@dataclass(frozen=True)
class OutputFile:
    path: str  # workspace-relative, e.g. forge-out/pkg/out.txt
    digest: str
    size: int
    executable: bool
    tree: bool = False  # a directory output: digest names its manifest (forge.trees)


# The resident server keeps each action cache open (opening one costs more than a no-op
# build's lookups); reopened when its database file was replaced or removed.
KEEP_OPEN = False
_OPEN: dict[str, tuple] = {}


def _db_inode(where: str) -> int | None:
    try:
        return os.stat(os.path.join(where, "cache.db")).st_ino
    except OSError:
        return None


class Cache:
    def __init__(self, root: Path):
        self.root = root
        self.cas = root / "cas"
        self.tmp = root / "tmp"
        self._ac = None
        for d in (self.cas, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def ac(self):
        if self._ac is None:
            where = str(self.root / "ac")
            kept = _OPEN.get(where) if KEEP_OPEN else None
            if kept is not None and kept[0] == _db_inode(where):
                self._ac = kept[1]
                return self._ac
            import diskcache
            # diskcache silently evicts at 1 GiB by default: forge does its own gc.
            self._ac = diskcache.Cache(where, size_limit=2 ** 62,
                                       eviction_policy="none", cull_limit=0,
                                       disk_min_file_size=2 ** 30)
            if KEEP_OPEN:
                _OPEN[where] = (_db_inode(where), self._ac)
        return self._ac

    def close(self) -> None:
        if self._ac is not None:
            if not KEEP_OPEN:
                self._ac.close()
            self._ac = None

    # --- blobs ----------------------------------------------------------------------

    def blob_path(self, digest: str, executable: bool = False) -> Path:
        return self.cas / digest[:2] / (digest + (".x" if executable else ""))

    def put_file(self, src: Path, executable: bool, digest: str | None = None) -> OutputFile:
        """Move `src` (on this filesystem, e.g. a sandbox output) into the CAS."""
        digest = digest or digest_file(src)
        size = src.stat().st_size
        dst = self.blob_path(digest, executable)
        if not _has_size(dst, size):
            dst.parent.mkdir(exist_ok=True)
            tmp = self.tmp / f"blob-{owner()}-{uuid.uuid4().hex}"
            try:
                os.link(src, tmp)
            except OSError:
                try:
                    shutil.copyfile(src, tmp)
                except BaseException:  # a full disk: no half blob left in tmp/
                    tmp.unlink(missing_ok=True)
                    raise
            os.chmod(tmp, 0o555 if executable else 0o444)
            os.replace(tmp, dst)
        else:
            touch(dst)
        return OutputFile("", digest, size, executable)

    def put_bytes(self, data: bytes, executable: bool = False) -> str:
        from forge.digest import digest_bytes
        digest = digest_bytes(data)
        dst = self.blob_path(digest, executable)
        if not dst.exists():
            dst.parent.mkdir(exist_ok=True)
            tmp = self.tmp / f"blob-{owner()}-{uuid.uuid4().hex}"
            tmp.write_bytes(data)
            os.chmod(tmp, 0o555 if executable else 0o444)
            os.replace(tmp, dst)
        return digest

    def blob_ok(self, f: OutputFile) -> bool:
        """Present and of the right size; the content is checked when it is linked out."""
        try:
            return self.blob_path(f.digest, f.executable).stat().st_size == f.size
        except OSError:
            return False

    def verify(self, f: OutputFile) -> bool:
        p = self.blob_path(f.digest, f.executable)
        try:
            return p.stat().st_size == f.size and digest_file(p) == f.digest
        except OSError:
            return False

    def drop_blob(self, f: OutputFile) -> None:
        try:
            self.blob_path(f.digest, f.executable).unlink()
        except OSError:
            pass

    def link_out(self, f: OutputFile, dst: Path) -> os.stat_result:
        """Materialise a blob at `dst` (read-only), replacing what is there."""
        src = self.blob_path(f.digest, f.executable)
        touch(src)
        try:
            if os.path.samefile(src, dst):
                return dst.stat()
        except OSError:
            pass
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.forge-tmp-{owner()}-{uuid.uuid4().hex[:8]}")
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            try:
                shutil.copyfile(src, tmp)
            except BaseException:  # a full disk, Ctrl-C: no half copy beside the outputs
                tmp.unlink(missing_ok=True)
                raise
            os.chmod(tmp, 0o555 if f.executable else 0o444)
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        return dst.stat()

    # --- action cache ---------------------------------------------------------------

    def get_record(self, key: str) -> list[OutputFile] | None:
        rec = self.ac.get(key)
        if not rec or rec.get("v") != RECORD_VERSION:
            return None
        return [OutputFile(*o) for o in rec["outputs"]]

    def put_record(self, key: str, outputs: list[OutputFile]) -> None:
        self.ac.set(key, {"v": RECORD_VERSION, "time": time.time(),
                          "outputs": [(o.path, o.digest, o.size, o.executable, o.tree)
                                      for o in outputs]})

    def put_records(self, items: list[tuple[str, list[OutputFile]]]) -> None:
        """Several records in one SQLite transaction (outputs fetched from a remote cache)."""
        with self.ac.transact():
            for key, outputs in items:
                self.put_record(key, outputs)

    def drop_record(self, key: str) -> None:
        self.ac.delete(key)

    # --- maintenance ----------------------------------------------------------------

    def blobs(self):
        for sub in self.cas.iterdir():
            if sub.is_dir():
                for p in sub.iterdir():
                    try:
                        st = p.stat()
                    except OSError:
                        continue
                    yield p, st

    def stats(self) -> dict:
        n = size = 0
        for _, st in self.blobs():
            n += 1
            size += st.st_size
        return {"dir": str(self.root), "blobs": n, "bytes": size, "records": len(self.ac)}

    def gc(self, max_size: int) -> dict:
        """Delete least-recently-used blobs until the CAS fits `max_size` bytes,
        then the records that pointed at them."""
        entries = sorted(self.blobs(), key=lambda e: e[1].st_atime)
        total = sum(st.st_size for _, st in entries)
        removed = freed = 0
        gone: set[str] = set()
        for p, st in entries:
            if total <= max_size:
                break
            try:
                p.unlink()
            except OSError:
                continue
            total -= st.st_size
            freed += st.st_size
            removed += 1
            gone.add(p.name.removesuffix(".x"))
        dropped = 0
        if gone:
            for key in list(self.ac.iterkeys()):
                rec = self.ac.get(key)
                if not rec or any(o[1] in gone for o in rec.get("outputs", [])):
                    self.ac.delete(key)
                    dropped += 1
        self._clean_tmp()
        return {"blobs_removed": removed, "bytes_freed": freed, "records_dropped": dropped,
                "bytes_kept": total}

    def _clean_tmp(self, older_than: float = 24 * 3600) -> None:
        """Remove leftovers of killed builds (failed sandboxes are kept a day for debugging)."""
        now = time.time()
        for p in self.tmp.iterdir():
            try:
                if now - p.lstat().st_mtime > older_than:
                    force_rmtree(p) if p.is_dir() else p.unlink()
            except OSError:
                pass


def touch(path: Path) -> None:
    """Mark a blob used now, for gc's LRU order. Only the access time changes: the
    modification time is shared with the workspace's hard links, where a change
    would make every output look modified."""
    try:
        st = path.stat()
        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
    except OSError:
        pass


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B") if text.strip().upper().endswith("B") \
        else text.strip().upper()
    num = t.rstrip("KMGT")
    unit = t[len(num):]
    try:
        return int(float(num) * units[unit])
    except (ValueError, KeyError):
        raise ValueError(f"invalid size '{text}': use a number with an optional K, M, G or T suffix")
