"""Every fuzz harness, by name: the engine's files (targets_engine), the text formats
(targets_text), images (targets_images), a registry's answers to a pull
(targets_registry), Debian's formats (targets_debian) and signatures (targets_sign)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # package_builders, for bench/fuzz

import targets_debian  # noqa: E402
import targets_engine  # noqa: E402
import targets_images  # noqa: E402
import targets_registry  # noqa: E402
import targets_sign  # noqa: E402
import targets_text  # noqa: E402

HARNESSES = {h.name: h for m in (targets_engine, targets_text, targets_images, targets_registry,
                                targets_debian, targets_sign)
             for h in m.HARNESSES}
