"""The OCI distribution API: a client that resolves, pulls (verified) and pushes images
between a registry and an image layout; its errors, authentication, HTTP transport and
blob transfers.

May import: `forge.formats.common`, `forge.formats.http`, `forge.formats.image`.
"""
