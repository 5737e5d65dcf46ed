"""Unified kernel images: systemd's EFI stub with the kernel, the initrd, the command line
and an os-release as PE sections, one EFI executable that UEFI starts directly (and Secure
Boot verifies as one signed file, command line and initrd included).

The stub is systemd-boot-efi's linuxx64.efi.stub. The sections are added after the
stub's last one, as systemd's ukify does: each at the next virtual address aligned to
the stub's SectionAlignment, its data at the end of the file aligned to FileAlignment, in
the order .osrel .cmdline .uname .initrd .linux. Everything is computed from the inputs
(no time, no path, no random), so the same inputs give the same bytes; pefile only
parses the stub. A signature on the stub is dropped: it could not cover the new
sections, and forge signs the whole UKI (forge.formats.disk.sbsign).
"""

from __future__ import annotations

import array
import struct

import pefile

from forge.formats.disk.errors import DiskImageError

__all__ = ["OUTPUT", "STUB_PATH", "build", "kernel_release", "os_release", "sections"]

OUTPUT = "{name}.efi"
# Where Debian's systemd-boot-efi installs the x86-64 stub.
STUB_PATH = "usr/lib/systemd/boot/efi/linuxx64.efi.stub"

_SECTION_HEADER = struct.Struct("<8sIIIIIIHHI")
# IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ: data the stub reads, never code.
_DATA_READ = 0x40000040
_EFI_APPLICATION = 10
_AMD64 = 0x8664
_PE32_PLUS = 0x20B
_SECURITY = pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_SECURITY"]


def _align(n: int, unit: int) -> int:
    return (n + unit - 1) // unit * unit


def kernel_release(kernel: bytes) -> str | None:
    """The release string of an x86 bzImage (`uname -r`), from its setup header's
    kernel_version pointer; None if the image has none."""
    if len(kernel) < 0x210 or kernel[0x202:0x206] != b"HdrS":
        return None
    ptr = struct.unpack_from("<H", kernel, 0x20E)[0]
    if not ptr:
        return None
    start = ptr + 0x200
    text = kernel[start:start + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    return text.split(" ", 1)[0] or None


def os_release(name: str) -> str:
    """The .osrel of an image named `name`: what boot menus list it as."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "forge"
    return (f'NAME="{safe}"\nID=forge\nPRETTY_NAME="{safe} (forge)"\n'
            f"IMAGE_ID={safe}\n")


def _check_stub(stub: bytes) -> pefile.PE:
    try:
        pe = pefile.PE(data=stub, fast_load=True)
    except pefile.PEFormatError as e:
        raise DiskImageError(f"the EFI stub is not a PE file: {e}") from None
    if (pe.FILE_HEADER.Machine != _AMD64 or pe.OPTIONAL_HEADER.Magic != _PE32_PLUS
            or pe.OPTIONAL_HEADER.Subsystem != _EFI_APPLICATION):
        raise DiskImageError("the EFI stub is not an x86-64 EFI application "
                             "(systemd-boot-efi's linuxx64.efi.stub is)")
    names = {s.Name.rstrip(b"\0") for s in pe.sections}
    if b".sdmagic" not in names:
        raise DiskImageError("the EFI stub has no .sdmagic section: it is not systemd's "
                             "linuxx64.efi.stub")
    taken = names & {b".linux", b".initrd", b".cmdline", b".osrel", b".uname"}
    if taken:
        raise DiskImageError(f"the EFI stub already has {b', '.join(sorted(taken)).decode()}: "
                             "it is a UKI, not a stub")
    return pe


def sections(kernel: bytes, initrd: bytes, cmdline: str, osrel: str) -> list[tuple[bytes, bytes]]:
    """The (name, data) sections a UKI adds to the stub, in order."""
    out = [(b".osrel", osrel.encode()), (b".cmdline", cmdline.encode() + b"\0")]
    release = kernel_release(kernel)
    if release:
        out.append((b".uname", release.encode()))
    return out + [(b".initrd", initrd), (b".linux", kernel)]


def build(stub: bytes, *, kernel: bytes, initrd: bytes, cmdline: str, osrel: str) -> bytes:
    """The UKI of `kernel` + `initrd` booting with `cmdline`, as bytes."""
    if "\n" in cmdline or "\r" in cmdline:
        raise DiskImageError("the kernel command line must be one line")
    if kernel_release(kernel) is None and kernel[:2] != b"MZ":
        raise DiskImageError("the kernel is not an x86 bzImage")
    pe = _check_stub(stub)
    opt = pe.OPTIONAL_HEADER
    falign, salign = opt.FileAlignment, opt.SectionAlignment
    new = sections(kernel, initrd, cmdline, osrel)
    table_end = pe.sections[-1].get_file_offset() + _SECTION_HEADER.size
    first_data = min((s.PointerToRawData for s in pe.sections if s.SizeOfRawData),
                     default=opt.SizeOfHeaders)
    room = min(first_data, opt.SizeOfHeaders) - table_end
    if room < _SECTION_HEADER.size * len(new):
        raise DiskImageError(f"the EFI stub's headers have room for {room // 40} more "
                             f"sections, and a UKI adds {len(new)}")
    # The file ends with the last section's data: a signature or debug data after it goes.
    end = max(s.PointerToRawData + s.SizeOfRawData for s in pe.sections)
    out = bytearray(stub[:end])
    out += bytes(_align(len(out), falign) - len(out))
    va = _align(max(s.VirtualAddress + max(s.Misc_VirtualSize, s.SizeOfRawData)
                    for s in pe.sections), salign)
    headers, initialized = bytearray(), 0
    for name, data in new:
        raw = _align(len(data), falign)
        headers += _SECTION_HEADER.pack(name, len(data), va, raw, len(out), 0, 0, 0, 0, _DATA_READ)
        out += data + bytes(raw - len(data))
        initialized += raw
        va = _align(va + len(data), salign)
    out[table_end:table_end + len(headers)] = headers
    fh, oh = pe.FILE_HEADER, opt
    struct.pack_into("<H", out, fh.get_field_absolute_offset("NumberOfSections"),
                     fh.NumberOfSections + len(new))
    struct.pack_into("<I", out, oh.get_field_absolute_offset("SizeOfImage"), va)
    struct.pack_into("<I", out, oh.get_field_absolute_offset("SizeOfInitializedData"),
                     (oh.SizeOfInitializedData + initialized) & 0xFFFFFFFF)
    security = oh.DATA_DIRECTORY[_SECURITY]
    struct.pack_into("<II", out, security.get_file_offset(), 0, 0)
    checksum_at = oh.get_field_absolute_offset("CheckSum")
    struct.pack_into("<I", out, checksum_at, 0)
    struct.pack_into("<I", out, checksum_at, pe_checksum(out))
    return bytes(out)


def pe_checksum(data: bytes | bytearray) -> int:
    """The PE image checksum (the CheckSum field must be zero in `data`): the 16-bit
    one's-complement sum of the file plus its length, as imagehlp's CheckSumMappedFile."""
    words = array.array("H")
    words.frombytes(bytes(data) + (b"\0" if len(data) % 2 else b""))
    if struct.pack("=H", 1) != b"\1\0":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (total + len(data)) & 0xFFFFFFFF
