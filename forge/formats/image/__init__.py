"""OCI images: the spec (media types, descriptors, digests, platforms, the one
`LayoutError`), references, layers read (safe extraction) and written (reproducible
normalise/flatten), the image layout on disk, and docker/OCI archives.

May import: `forge.formats.common`.
"""
