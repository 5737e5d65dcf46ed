"""Root filesystem images: LinuxKit's kernel+squashfs, kernel+erofs and kernel+iso, with
Debian's tools, without root, loop devices or Docker, byte for byte reproducible.

Each holds the whole root tree, the same tree the initrd unpacks to: every fragment in
initrd order, a later entry replacing an earlier one at the same path (a directory's
metadata too, as the kernel's initramfs unpacker does; a non-directory over a directory
drops what was below it), parents a fragment left implicit made 0755 root-owned, the
mount points and `dev/console` (character device 5,1) that the initrd's first segment
carries. File names for an assembly named N are LinuxKit's (moby/build/output.go):
`N-squashfs.img`, `N-erofs.img`, `N.iso`, beside `N-kernel` and `N-cmdline`.

How, without root: the merged tree is written as one tar, sorted, then unpacked by GNU
tar and imaged by mksquashfs / mkfs.erofs / xorriso inside one fakeroot session, so the
tools see the fragments' ownership, modes and device nodes (mkfs.erofs 1.5 cannot set
ownership itself and none of them reads a tar). xorriso writes Rock Ridge with the real
ownership (`-R`, as LinuxKit's mkimage-iso; `-r` would make everything root's).

Reproducibility: the tar is sorted and carries every mode and owner (GNU tar unpacks it
with `-p --numeric-owner`, so the umask and the host's users do not matter); times come
from the epoch (mksquashfs `-mkfs-time`/`-all-time`, mkfs.erofs `-T`, xorriso's dates as
in forge.formats.disk.images); mkfs.erofs gets a UUID derived from the name; extended
attributes are left out (the fragments have none; the host's must not leak in).

Booting them is forge.formats.linux.bootinitrd's part.
"""

from __future__ import annotations

import os
import stat
import tarfile
import time
import uuid
from pathlib import Path

from forge.formats.disk.errors import DiskImageError
from forge.formats.disk.images import volume_id
from forge.formats.disk.tools import find_tool, run, tool_env

__all__ = ["BOOT_INITRD", "FORMATS", "build", "tools", "merge_fragments", "volume_uuid"]

BOOT_INITRD = "{name}-boot-initrd.img"
# format -> output files: kernel, root image, command line (LinuxKit's), boot initrd (forge's)
FORMATS: dict[str, tuple[str, ...]] = {
    "kernel+squashfs": ("{name}-kernel", "{name}-squashfs.img", "{name}-cmdline", BOOT_INITRD),
    "kernel+erofs": ("{name}-kernel", "{name}-erofs.img", "{name}-cmdline", BOOT_INITRD),
    "kernel+iso": ("{name}-kernel", "{name}.iso", "{name}-cmdline", BOOT_INITRD),
}
_MAKER = {"kernel+squashfs": "mksquashfs", "kernel+erofs": "mkfs.erofs", "kernel+iso": "xorriso"}
_MOUNT_POINTS = {"proc": 0o755, "sys": 0o755, "dev": 0o755, "tmp": 0o1777, "run": 0o755}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DiskImageError(f"unknown root image format {fmt!r}; known: {', '.join(FORMATS)}")


def tools(fmt: str) -> list[str]:
    """The host executables `fmt` runs, absolute and sorted, for the action's key; a
    DiskImageError names the Debian package of a missing one."""
    _check_format(fmt)
    return sorted(str(find_tool(t)) for t in ("fakeroot", "tar", _MAKER[fmt]))


# ---- the merged tree --------------------------------------------------------------------

def _norm(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DiskImageError(f"fragment member {name!r} leaves the root")
    return "/".join(parts)


def _key(path: str) -> tuple:
    return tuple(path.split("/"))  # parents sort before their children


def _fragment_tar(path: Path) -> Path:
    return path / "rootfs.tar" if path.is_dir() else path


def merge_fragments(fragments: list[Path], out: Path, *, epoch: int) -> None:
    """Write the root tree of `fragments` (tars, or directories holding rootfs.tar, in
    initrd order) as one sorted tar at `out`."""
    tars = [tarfile.open(_fragment_tar(Path(f))) for f in fragments]
    try:
        tree: dict[str, tuple[int, tarfile.TarInfo]] = {}  # path -> (fragment, its data)
        for path, mode in _MOUNT_POINTS.items():
            tree[path] = (-1, _base(path, tarfile.DIRTYPE, mode))
        console = _base("dev/console", tarfile.CHRTYPE, 0o600)
        console.devmajor, console.devminor = 5, 1
        tree["dev/console"] = (-1, console)
        for i, tf in enumerate(tars):
            latest: dict[str, tarfile.TarInfo] = {}  # a hardlink names the member before it
            for m in tf:
                name = _norm(m.name)
                if not name:
                    continue
                src = _link_target(m, latest) if m.islnk() else m
                latest[name] = src
                old = tree.get(name)
                if old is not None and old[1].isdir() and not m.isdir():
                    for k in [k for k in tree if k.startswith(name + "/")]:
                        del tree[k]
                tree[name] = (i, src)
        _write(tree, tars, out, epoch)
    finally:
        for tf in tars:
            tf.close()


def _base(path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(path)
    ti.type, ti.mode = kind, mode
    return ti


def _write(tree: dict, tars: list, out: Path, epoch: int) -> None:
    # Hardlinks: the first name (in sorted order) of each inode carries the data, the
    # others link to it; a link whose target a later fragment replaced keeps the old data.
    first: dict[tuple[int, int], str] = {}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as w:
        root = _base(".", tarfile.DIRTYPE, 0o755)
        root.mtime = epoch
        w.addfile(root)
        made = {""}
        for name in sorted(tree, key=_key):
            i, src = tree[name]
            _parents(w, name, made, epoch)
            made.add(name)
            ti = tarfile.TarInfo(name)
            ti.mode, ti.uid, ti.gid, ti.mtime = src.mode & 0o7777, src.uid, src.gid, epoch
            ti.uname = ti.gname = ""
            if src.isreg():
                ident = (i, src.offset)
                if ident in first:
                    ti.type, ti.linkname = tarfile.LNKTYPE, first[ident]
                    w.addfile(ti)
                    continue
                first[ident] = name
                ti.type, ti.size = tarfile.REGTYPE, src.size
                w.addfile(ti, tars[i].extractfile(src))
                continue
            ti.type = src.type
            if src.issym():
                ti.linkname = src.linkname
            elif src.ischr() or src.isblk():
                ti.devmajor, ti.devminor = src.devmajor, src.devminor
            elif not (src.isdir() or src.isfifo()):
                raise DiskImageError(f"{name}: tar member type {src.type!r} cannot go in a root image")
            w.addfile(ti)


def _parents(w: tarfile.TarFile, name: str, made: set, epoch: int) -> None:
    parts = name.split("/")
    for k in range(1, len(parts)):
        p = "/".join(parts[:k])
        if p not in made:
            ti = _base(p, tarfile.DIRTYPE, 0o755)
            ti.mtime = epoch
            w.addfile(ti)
            made.add(p)


def _link_target(m: tarfile.TarInfo, latest: dict[str, tarfile.TarInfo]) -> tarfile.TarInfo:
    """What a hardlink shares: its target as it stood when the link was read (a link to
    anything but a regular file becomes a copy of it, as in the initrd)."""
    found = latest.get(_norm(m.linkname))
    if found is None:
        raise DiskImageError(f"hardlink {m.name!r}: its target {m.linkname!r} is not before "
                             "it in its fragment")
    return found


# ---- the image --------------------------------------------------------------------------

def volume_uuid(name: str, fmt: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"forge:{fmt}:{name}")


def build(fmt: str, *, fragments: list[Path], name: str, out: Path, workdir: Path,
          epoch: int) -> Path:
    """Write `fmt`'s root image of `fragments` to `out`. `workdir` is scratch space
    (empty, private); `epoch` is SOURCE_DATE_EPOCH."""
    _check_format(fmt)
    if not name or "/" in name or name in (".", ".."):
        raise DiskImageError(f"image name {name!r} cannot be a file name")
    if epoch < 0:
        raise DiskImageError(f"SOURCE_DATE_EPOCH {epoch} is before 1970")
    tools(fmt)  # every missing tool is reported before anything runs
    workdir.mkdir(parents=True, exist_ok=True)
    env = tool_env(workdir, epoch)
    merged, tree, state = workdir / "rootfs.tar", workdir / "rootfs", workdir / "fakeroot.state"
    merge_fragments(fragments, merged, epoch=epoch)
    tree.mkdir()
    out = Path(out).resolve()
    fakeroot = str(find_tool("fakeroot"))
    run([fakeroot, "-s", state, "--", find_tool("tar"), "-x", "-p", "--numeric-owner",
         "--same-owner", "-f", merged, "-C", tree], env)
    _readable(tree)
    if fmt == "kernel+squashfs":  # it refuses the variable beside its own time options
        env = {k: v for k, v in env.items() if k != "SOURCE_DATE_EPOCH"}
    try:
        run([fakeroot, "-i", state, "--", *_maker_argv(fmt, tree, out, name, epoch)], env,
            cwd=workdir)
    except BaseException:
        out.unlink(missing_ok=True)  # never leave a partial image behind
        raise
    return out


def _readable(tree: Path) -> None:
    """Without root, a file of mode 0000 (etc/shadow in some images) cannot be read, and
    mksquashfs would store it empty: give the owner read access, and directories full
    access, on the real files. The modes the tools see are fakeroot's, kept as unpacked."""
    for d, dirs, files in os.walk(tree):
        for n in dirs:
            os.chmod(os.path.join(d, n), 0o700 | os.lstat(os.path.join(d, n)).st_mode & 0o777)
        for n in files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(p, 0o600 | st.st_mode & 0o777)


def _maker_argv(fmt: str, tree: Path, out: Path, name: str, epoch: int) -> list:
    if fmt == "kernel+squashfs":
        return [find_tool("mksquashfs"), tree, out, "-noappend", "-no-xattrs",
                "-mkfs-time", str(epoch), "-all-time", str(epoch), "-no-progress", "-quiet"]
    if fmt == "kernel+erofs":
        return [find_tool("mkfs.erofs"), "--quiet", f"-T{epoch}", "-x-1",
                f"-U{volume_uuid(name, fmt)}", out, tree]
    # xorriso takes the date 0 for "not set" and writes the current time instead (into
    # the Rock Ridge time stamps): an epoch of 0 is written as 1 s past it.
    stamp = time.strftime("%Y%m%d%H%M%S00", time.gmtime(max(epoch, 1)))
    return [find_tool("xorriso"), "-no_rc", "-as", "mkisofs", "-o", out, "-V", volume_id(name),
            "-R", "-J", "-joliet-long", "-l", "--modification-date=" + stamp,
            "--set_all_file_dates", stamp, tree]
