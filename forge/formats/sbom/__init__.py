"""Software bills of materials: SPDX 2.3 JSON documents written from what forge built and
the records its steps kept (forge.formats.debian.inventory), and the SPDX attestations
pulled images carry.

May import: `forge.formats.common`, `forge.formats.image`, `forge.formats.debian`.
"""
