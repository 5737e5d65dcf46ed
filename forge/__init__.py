"""forge: a declarative build system for operating-system images.

Kept import-free so that `forge --version` stays fast.
"""

__version__ = "0.1.0"
