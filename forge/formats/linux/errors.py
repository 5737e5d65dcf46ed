"""The errors of kernel modules, cpio archives and fragments: one module, so a caller knows where to find them."""

from __future__ import annotations
from forge.formats.errors import FormatError


class ModuleError(FormatError, KeyError):
    """An unknown module, a dependency cycle, or a file that is not a module."""

    def __str__(self) -> str:  # KeyError would show the message quoted, as a key
        return str(self.args[0]) if self.args else ""


class CpioError(FormatError, ValueError):
    """An entry a newc archive cannot hold (a name past PATH_MAX, a field past 32 bits, a
    hardlink to nothing); a ValueError too, as the writer's callers have long caught."""


class BootInitrdError(FormatError):
    """The root filesystem cannot make a boot initrd: no static busybox, or a module's
    dependency the kernel's module tar lacks."""
