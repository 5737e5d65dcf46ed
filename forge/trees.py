"""Directory outputs ("tree artifacts"): a directory an action declares as one output.

A tree is stored as its files' blobs plus a manifest blob, a JSON list of entries
sorted by path:

    {"v": 1, "entries": [["blobs", "d"],
                         ["blobs/sha256/ab..", "f", "<xxh3 digest>", 1234, false],
                         ["latest", "l", "blobs/sha256/ab.."]]}

`d` is a directory, `f` a regular file (digest, size, executable), `l` a symlink
(its target, which must stay inside the tree). The manifest's digest is the tree's
digest: it is what downstream keys see, so a tree whose bytes did not change
stops a rebuild like a file does. Identical files in different trees (the same
image layer in two images) are one blob.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from forge.cache import Cache, OutputFile
from forge.errors import ForgeError
from forge.leftovers import force_rmtree, owner

FORMAT = 1


class TreeError(ForgeError):
    exit_code = 1


def store(cache: Cache, root: Path, path: str,
          known: dict[int, tuple[OutputFile, int]] | None = None) -> OutputFile:
    """Hash the directory `root` into the cache; its OutputFile carries the manifest.

    `known` maps inodes of cache blobs the action was given (hard links of its inputs)
    to those blobs: a file that is still one of them (an image layer carried over from
    the parent image) is recorded without being read again."""
    from forge.formats.common.treepath import symlink_escapes  # only when a tree is stored
    entries = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = f"{rel_dir}/{name}" if rel_dir else name
            st = os.lstat(full)
            if os.path.islink(full):
                target = os.readlink(full)
                if os.path.isabs(target) or symlink_escapes(rel.split("/")[:-1], target):
                    raise TreeError(f"output directory {path} holds a symlink {rel} -> {target} "
                                    "that points outside it")
                entries.append([rel, "l", target])
            elif name in dirnames:
                entries.append([rel, "d"])
            elif os.path.isfile(full):
                exe = bool(st.st_mode & 0o111)
                f, mtime = (known or {}).get(st.st_ino, (None, 0))
                if f is None or (f.size, f.executable, mtime) != (st.st_size, exe, st.st_mtime_ns):
                    f = cache.put_file(Path(full), exe)
                entries.append([rel, "f", f.digest, f.size, exe])
                total += f.size
            else:
                raise TreeError(f"output directory {path} holds {rel}, which is neither a file, "
                                "a directory nor a symlink")
    entries.sort(key=lambda e: e[0])
    return OutputFile(path, cache.put_bytes(encode(entries)), total, False, True)


def encode(entries: list[list]) -> bytes:
    """The manifest of entries sorted by path: the same entries give the same bytes (a
    tree fetched from a remote cache gets the digest it had where it was built)."""
    return json.dumps({"v": FORMAT, "entries": entries}, separators=(",", ":")).encode()


def entries(cache: Cache, f: OutputFile) -> list[list]:
    with open(cache.blob_path(f.digest), "rb") as fh:
        data = json.load(fh)
    if data.get("v") != FORMAT:
        raise TreeError(f"tree manifest {f.digest} has an unknown format")
    return data["entries"]


def blobs_ok(cache: Cache, f: OutputFile, verify: bool) -> bool:
    """Every blob of the tree is present (and, with `verify`, has the right content)."""
    check = cache.verify if verify else cache.blob_ok
    try:
        if not check(OutputFile("", f.digest, cache.blob_path(f.digest).stat().st_size, False)):
            return False
        for e in entries(cache, f):
            if e[1] == "f" and not check(OutputFile("", e[2], e[3], e[4])):
                return False
    except (OSError, ValueError, TreeError):
        return False
    return True


def build(cache: Cache, f: OutputFile, dst: Path,
          known: dict[int, tuple[OutputFile, int]] | None = None) -> None:
    """Recreate the tree at `dst` (which must not exist) from hard links to its blobs;
    `known` collects the inodes of the blobs linked (see `store`)."""
    dst.mkdir(parents=True)
    for e in entries(cache, f):
        p = dst / e[0]
        if e[1] == "d":
            p.mkdir()
        elif e[1] == "l":
            os.symlink(e[2], p)
        else:
            src = cache.blob_path(e[2], e[4])
            try:
                os.link(src, p)
                if known is not None:
                    st = os.stat(p)
                    known[st.st_ino] = (OutputFile("", e[2], e[3], e[4]), st.st_mtime_ns)
            except OSError:
                shutil.copyfile(src, p)
                os.chmod(p, 0o555 if e[4] else 0o444)


def materialise(cache: Cache, f: OutputFile, dst: Path) -> os.stat_result:
    """Replace whatever is at `dst` with the tree, atomically from a reader's view."""
    tmp = dst.with_name(f".{dst.name}.forge-tmp-{owner()}-{uuid.uuid4().hex[:8]}")
    build(cache, f, tmp)
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        old = dst.with_name(f".{dst.name}.forge-old-{owner()}-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
        force_rmtree(old)
    os.rename(tmp, dst)
    return dst.stat()
