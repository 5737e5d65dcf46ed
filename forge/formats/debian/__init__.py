"""Debian: `.deb` packages, the archive indexes (Release, Packages) and version
comparison, and APT source lists.

May import: `forge.formats.common`, `forge.formats.http`.
"""
