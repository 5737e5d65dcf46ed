"""What every domain shares: path safety inside a tree (symlinks resolved as a chroot would),
compression detection and decoding, canonical JSON and atomic writes.

May import: the standard library, `forge.formats.errors`, and `zstandard` (a dependency of
forge) for zstd.
"""
