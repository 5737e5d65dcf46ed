"""A real kernel and a tiny initrd to boot under QEMU, shared by the boot tests.

- `cloud_kernel` (session): Debian's cloud kernel (`linux-image-cloud-amd64`, followed to
  the versioned package) from the mirror the machine's apt sources name, checked against
  the index's sha256 when downloaded, and kept under ~/.cache/forge-tests/ (or
  $FORGE_TEST_CACHE) so later runs need no network: the cached .deb is re-checked
  against the recorded sha256 instead.
- `boot_initrd` (session): a gzip newc initrd of the host's static busybox whose /init
  mounts /proc, prints `MARKER` on the console and powers off; `busybox_initrd()` makes
  one with another /init and extra files (e.g. a service and its kernel modules).

    from boot_fixture import MARKER, boot_initrd, cloud_kernel  # noqa: F401 (fixtures)

- `make_test_key(dir)`: a fresh Secure Boot db key and certificate (openssl), for the
  signing and Secure Boot boot tests.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require
from forge.formats.debian.errors import DebError
from forge.formats.debian import sources as aptsources
from forge.formats.linux import cpio
from forge.formats.debian import archive
from forge.formats.debian.keyring import apt_keyrings
from forge.formats.debian.package import open_data_tar

MARKER = "FORGE-BOOT-OK"
BUSYBOX = Path("/bin/busybox")
CMDLINE = "console=ttyS0 panic=-1 quiet"  # panic=-1: a crashed init ends qemu at once
CACHE = Path(os.environ.get("FORGE_TEST_CACHE") or Path.home() / ".cache" / "forge-tests")
SUITE = "bookworm"
PACKAGE = "linux-image-cloud-amd64"

INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo {MARKER}
/bin/busybox poweroff -f
"""


@dataclass(frozen=True)
class Kernel:
    deb: Path      # the kernel package (modules are in its data.tar)
    vmlinuz: Path  # the bootable image
    version: str   # e.g. 6.1.0-37-cloud-amd64


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _from_cache(record: Path) -> Kernel | None:
    try:
        rec = json.loads(record.read_text())
        k = Kernel(Path(rec["deb"]), Path(rec["vmlinuz"]), rec["version"])
        if _sha256(k.deb) == rec["sha256"] and _sha256(k.vmlinuz) == rec["vmlinuz_sha256"]:
            return k
    except (OSError, ValueError, KeyError):
        pass
    return None


def fetch_cloud_kernel(cache: Path = CACHE) -> Kernel:
    """The cached cloud kernel, downloaded (and verified) the first time."""
    record = cache / "cloud-kernel.json"
    if (k := _from_cache(record)) is not None:
        return k
    mirror = aptsources.debian_mirror(aptsources.read_sources())
    require(mirror is not None, "no Debian mirror in the apt sources (needed for the kernel)")
    # Verified with what apt trusts for the mirror, as forge's own kernel rule does.
    keyrings = apt_keyrings(mirror, SUITE, aptsources.read_sources())
    index = archive.fetch_index(mirror, SUITE, keyrings=keyrings)
    entry = archive.resolve(index, PACKAGE)
    for _ in range(3):  # the metapackage depends on the versioned kernel package
        nxt = [alt for clause in archive.depends(entry) for alt in clause
               if alt.startswith("linux-image-") and alt != entry["Package"]]
        if not nxt:
            break
        entry = archive.resolve(index, nxt[0])
    path = archive.download(mirror, entry, cache / Path(entry["Filename"]).name)
    with open_data_tar(path) as tf:
        for m in tf:
            name = m.name.lstrip("./")
            if m.isfile() and name.startswith("boot/vmlinuz-"):
                version = name[len("boot/vmlinuz-"):]
                vmlinuz = cache / f"vmlinuz-{version}"
                tmp = cache / f".vmlinuz-{version}.part"
                tmp.write_bytes(tf.extractfile(m).read())
                os.replace(tmp, vmlinuz)
                break
        else:
            raise DebError(f"{path} holds no boot/vmlinuz-*")
    record.write_text(json.dumps({"deb": str(path), "sha256": entry["SHA256"].lower(),
                                  "vmlinuz": str(vmlinuz), "vmlinuz_sha256": _sha256(vmlinuz),
                                  "version": version}, indent=1))
    return Kernel(path, vmlinuz, version)


def busybox_initrd(dest: Path, init: str = INIT, files: dict[str, bytes | Path] | None = None,
                   *, mtime: int = 0) -> Path:
    """A gzip newc initrd: static busybox as /bin/busybox and /bin/sh, `init` as /init,
    `files` (path in the image -> content or host file, mode 0755) added last."""
    require(BUSYBOX.is_file(), f"{BUSYBOX} is missing (Debian package busybox-static)")
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0,
                                                filename="", compresslevel=6) as gz:
        w = cpio.CpioWriter(gz, mtime=mtime)
        for d in ("bin", "dev", "proc", "sys", "tmp"):
            w.add_dir(d)
        w.add_device("dev/console", "c", 5, 1)
        w.add_file("bin/busybox", BUSYBOX, 0o755)
        w.add_symlink("bin/sh", "busybox")
        w.add_file("init", init.encode(), 0o755)
        made = {"bin", "dev", "proc", "sys", "tmp"}
        for path, data in sorted((files or {}).items()):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in made:
                    w.add_dir(d)
                    made.add(d)
            w.add_file(path.strip("/"), data, 0o755)
        w.close()
    return dest


@pytest.fixture(scope="session")
def cloud_kernel() -> Kernel:
    return fetch_cloud_kernel()


@pytest.fixture(scope="session")
def boot_initrd(tmp_path_factory) -> Path:
    return busybox_initrd(tmp_path_factory.mktemp("initrd") / "initrd.img")


def make_test_key(where: Path) -> tuple[Path, Path]:
    """A fresh self-signed RSA key and certificate, as a Secure Boot db key."""
    where.mkdir(parents=True, exist_ok=True)
    key, cert = where / "db.key", where / "db.crt"
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=forge test db/", "-days", "3650", "-keyout", key,
                    "-out", cert], check=True, capture_output=True)
    return key, cert
