"""Build provenance: in-toto Statements with SLSA provenance v1 predicates, as plain data.

May import: `forge.formats.common`.
"""
