"""What the Linux kernel reads at boot: cpio newc initrd archives, root-filesystem
fragments (reproducible tars of a tree), and kernel modules (modinfo, load order).

May import: `forge.formats.common`, `forge.formats.image`.
"""
