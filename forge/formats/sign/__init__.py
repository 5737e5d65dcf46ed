"""Signatures: signing keys (ECDSA P-256 and Ed25519 in PEM), DSSE envelopes, and in-toto
Statements whose subjects name artifacts by sha256.

May import: the standard library, `cryptography`, `forge.formats.common`.
"""
