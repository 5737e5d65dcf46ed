"""Bootable disk images: ISO (BIOS and EFI), raw and qcow2 disks, the FAT EFI system
partition, the raw disk converted for clouds and hypervisors (AWS, GCP, VHD, VMDK), the
kernel+initrd tarball, and the host tools they need.

May import: `forge.formats.common`.
"""
