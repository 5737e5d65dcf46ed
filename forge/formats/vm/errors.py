"""The errors of running and probing VMs: one module, so a caller knows where to find them."""

from __future__ import annotations
from forge.formats.errors import FormatError


class QemuError(FormatError):
    """QEMU or its firmware is missing, or a VM could not be started or probed."""


class VMExited(QemuError):
    """QEMU ended before the probe answered."""

    def __init__(self, message: str, returncode: int, console_tail: str):
        super().__init__(message)
        self.returncode, self.console_tail = returncode, console_tail


class BootTimeout(QemuError):
    """The probe did not answer before the deadline."""

    def __init__(self, message: str, console_tail: str):
        super().__init__(message)
        self.console_tail = console_tail
