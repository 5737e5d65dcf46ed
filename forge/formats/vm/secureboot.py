"""Secure Boot under QEMU: OVMF's Secure Boot build and a variable store with a test
certificate enrolled as the platform key, key-exchange key and db, Secure Boot on and
Microsoft's keys left out, so the firmware starts only what that certificate signed.

The store is made by virt-fw-vars (PyPI virt-firmware) from OVMF's empty template; the
owner GUID of the entries is derived from the certificate, so the same certificate gives
the same store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from forge.formats.vm.errors import QemuError

__all__ = ["SECBOOT_CODE", "enforcing", "enrolled_vars", "secure_firmware", "virt_fw_vars"]

# Debian's ovmf: the Secure Boot builds (SMM, variables locked), 4M first.
SECBOOT_CODE = ("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_CODE.secboot.fd",
                "/usr/share/OVMF/OVMF_CODE_4M.ms.fd")
_VARS_FOR = {"/usr/share/OVMF/OVMF_CODE_4M.secboot.fd": "/usr/share/OVMF/OVMF_VARS_4M.fd",
             "/usr/share/OVMF/OVMF_CODE.secboot.fd": "/usr/share/OVMF/OVMF_VARS.fd",
             "/usr/share/OVMF/OVMF_CODE_4M.ms.fd": "/usr/share/OVMF/OVMF_VARS_4M.fd"}


def secure_firmware(arch: str = "amd64") -> Path:
    if arch != "amd64":
        raise QemuError(f"Secure Boot under QEMU is supported for amd64 guests, not {arch}")
    for code in SECBOOT_CODE:
        if os.path.isfile(code):
            return Path(code)
    raise QemuError("no Secure Boot build of OVMF (OVMF_CODE_4M.secboot.fd): install the "
                    "Debian package ovmf")


def virt_fw_vars() -> str:
    """virt-fw-vars: on PATH, or next to this Python (a virtual environment's bin)."""
    found = shutil.which("virt-fw-vars") or shutil.which(
        "virt-fw-vars", path=str(Path(sys.executable).parent))
    if found is None:
        raise QemuError("virt-fw-vars is not installed: pip install virt-firmware "
                        "(forge's dependencies include it)")
    return found


def enrolled_vars(cert: Path, out: Path, arch: str = "amd64") -> Path:
    """An OVMF variable store at `out` with `cert` (PEM) as PK, KEK and db and Secure Boot
    enforcing."""
    cert = Path(cert)
    try:
        text = cert.read_bytes()
    except OSError as e:
        raise QemuError(f"the Secure Boot certificate {cert}: {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise QemuError(f"{cert} is not a PEM certificate (-----BEGIN CERTIFICATE-----)")
    template = _VARS_FOR[str(secure_firmware(arch))]
    owner = str(uuid.UUID(bytes=hashlib.sha256(text).digest()[:16], version=4))
    argv = [virt_fw_vars(), "--input", template, "--output", str(out),
            "--set-pk", owner, str(cert), "--add-kek", owner, str(cert),
            "--add-db", owner, str(cert), "--secure-boot", "--no-microsoft"]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        raise QemuError(f"virt-fw-vars could not enrol {cert} (exit {p.returncode}):\n"
                        + "\n".join(p.stderr.strip().splitlines()[-10:]))
    return Path(out)


def enforcing(boot, secure_vars: Path):
    """`boot` (an EFI Boot of forge.formats.vm.machine) with Secure Boot enforcing."""
    if not boot.efi:
        raise QemuError("Secure Boot needs a UEFI boot (an -efi format)")
    return dataclasses.replace(boot, secure_vars=Path(secure_vars))
