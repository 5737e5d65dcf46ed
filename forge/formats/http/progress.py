"""A byte progress bar for large downloads, on a terminal only: small files finish before a
bar helps, and a log file should not fill with carriage returns."""

from __future__ import annotations

import sys

LARGE = 16 << 20  # bytes; smaller downloads show no bar


class Bar:
    """`update(n)` bytes, `reset()` after a restart, `close()`; silent unless shown."""

    def __init__(self, total: int | None, label: str, *, stream=None, threshold: int = LARGE):
        stream = stream or sys.stderr
        self._bar = None
        if total is not None and total >= threshold and _isatty(stream):
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=label[-40:], file=stream, unit="B",
                             unit_scale=True, unit_divisor=1024, leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def reset(self) -> None:
        if self._bar is not None:
            self._bar.reset()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
