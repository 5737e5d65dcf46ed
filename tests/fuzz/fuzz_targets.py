"""Every fuzz harness, by name: the engine's files (targets_engine), the text formats
(targets_text) and the archives and binary formats (targets_archives)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # package_builders, for bench/fuzz

import targets_archives  # noqa: E402
import targets_engine  # noqa: E402
import targets_text  # noqa: E402

HARNESSES = {h.name: h for m in (targets_engine, targets_text, targets_archives) for h in m.HARNESSES}
