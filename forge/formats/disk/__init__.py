"""Bootable disk images: ISO (BIOS and EFI), raw and qcow2 disks, the FAT EFI system
partition, and the host tools they need.

May import: `forge.formats.common`.
"""
