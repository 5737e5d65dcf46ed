"""Pure format libraries (OCI, registry, archives): no knowledge of the forge engine.

One domain per subpackage (docs/architecture.md). Every domain may import
`forge.formats.errors`, the base of all their errors.
"""
