"""dm-verity for the root-image formats (kernel+squashfs, kernel+erofs with `verity`):
the hash tree appended to the image file itself, and the kernel command line that opens
it read-only through dm-verity.

How, without root: `veritysetup format` (Debian's cryptsetup-bin) writes a hash tree to
a file as readily as to a device; no loop device or device-mapper is touched. The image
is padded with zeros to whole 4096-byte blocks, then its superblock and tree are written
after it (`--hash-offset` = the padded size), so one file is both the data and the hash
device, as it is one virtio disk at boot.

Reproducibility: the salt is the sha256 of the padded image and the superblock's UUID is
derived from that salt; the tree is then a function of the image's bytes alone.

The command line uses the kernel's own syntax for a device-mapper table,
`dm-mod.create="vroot,,,ro,<table>"` (Documentation/admin-guide/device-mapper/dm-init.rst),
and `root=/dev/dm-0`. Debian's kernels have device-mapper as a module (no
CONFIG_DM_INIT), so the boot initrd reads that argument and creates the device with
dmsetup; a kernel with dm-init built in would read the same argument itself.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from forge.formats.disk.errors import DiskImageError
from forge.formats.disk.tools import find_tool, run, tool_env

__all__ = ["BLOCK", "DEVICE", "Verity", "append_hash_tree", "cmdline_args", "tools",
           "with_verity"]

BLOCK = 4096
DEVICE = "vroot"  # the device-mapper name; the first one created is /dev/dm-0
_SALT_NS = uuid.UUID("5b0d3a52-4f0e-4c1a-9d0b-7a3e7c0f6e11")  # forge's, for the superblock UUID
_ROOT_HASH = re.compile(r"^Root hash:\s*([0-9a-f]{64})\s*$", re.M)
# Only the kernel's own table fields reach the command line: hex, digits, a device path.
_SAFE = re.compile(r"^[0-9a-z/_.-]+$")


@dataclass(frozen=True)
class Verity:
    """What dm-verity needs to open the image; `to_json`/`from_json` carry it between actions."""
    data_blocks: int
    root_hash: str
    salt: str
    algorithm: str = "sha256"

    @property
    def hash_start(self) -> int:
        """The tree's first block on the device: after the data and the 4096-byte superblock."""
        return self.data_blocks + 1

    def table(self, device: str = "/dev/vda") -> str:
        """The device-mapper table line (version 1 format, one device for data and hashes)."""
        for field in (device, self.root_hash, self.salt, self.algorithm):
            if not _SAFE.match(field):
                raise DiskImageError(f"{field!r} cannot go in a device-mapper table")
        sectors = self.data_blocks * BLOCK // 512
        return (f"0 {sectors} verity 1 {device} {device} {BLOCK} {BLOCK} {self.data_blocks} "
                f"{self.hash_start} {self.algorithm} {self.root_hash} {self.salt}")

    def to_json(self) -> dict:
        return {"data_blocks": self.data_blocks, "root_hash": self.root_hash,
                "salt": self.salt, "algorithm": self.algorithm}

    @classmethod
    def from_json(cls, d: dict) -> "Verity":
        try:
            return cls(int(d["data_blocks"]), str(d["root_hash"]), str(d["salt"]),
                       str(d.get("algorithm", "sha256")))
        except (KeyError, TypeError, ValueError) as e:
            raise DiskImageError(f"not a verity description: {e}") from None


def tools() -> list[str]:
    return [str(find_tool("veritysetup"))]


def append_hash_tree(image: Path, *, workdir: Path) -> Verity:
    """Pad `image` to whole blocks and append its dm-verity superblock and hash tree."""
    image = Path(image)
    size = image.stat().st_size
    if size == 0:
        raise DiskImageError(f"{image} is empty: there is nothing to verify")
    blocks = -(-size // BLOCK)
    with open(image, "r+b") as f:
        f.truncate(blocks * BLOCK)
    digest = hashlib.sha256()
    with open(image, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    salt = digest.hexdigest()
    out = run([find_tool("veritysetup"), "format", "--hash=sha256", "--format=1",
               f"--data-block-size={BLOCK}", f"--hash-block-size={BLOCK}",
               f"--data-blocks={blocks}", f"--hash-offset={blocks * BLOCK}",
               f"--salt={salt}", f"--uuid={uuid.uuid5(_SALT_NS, salt)}", image, image],
              tool_env(workdir, 0))
    found = _ROOT_HASH.search(out)
    if found is None:
        raise DiskImageError(f"veritysetup format printed no root hash for {image}:\n{out[-400:]}")
    return Verity(blocks, found.group(1), salt)


def cmdline_args(v: Verity, device: str = "/dev/vda") -> str:
    """The kernel command line arguments that open the root through dm-verity."""
    return f'dm-mod.create="{DEVICE},,,ro,{v.table(device)}" root=/dev/dm-0'


def with_verity(cmdline: str, v: Verity) -> str:
    """`cmdline` (the assembly's) with its own root= replaced by the verity device."""
    if "dm-mod.create=" in cmdline:
        raise DiskImageError("the command line already creates a device-mapper device "
                             "(dm-mod.create=); with verity, forge writes that argument itself")
    kept = [a for a in cmdline.split() if not a.startswith(("root=", "dm-mod.create="))]
    return " ".join([*kept, cmdline_args(v)])
