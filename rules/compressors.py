"""The compressor of the steps that compress, in their keys.

Compressed bytes are stable for one compressor version only (zlib for gzip; zstandard
and its libzstd for zstd). A rule that plans such a step puts `param(method)` in its
params under "compressor", so another compressor makes another key; the step calls
`check` first, so it never stores another compressor's bytes under that key (a plan made
before an upgrade, reused from the plan cache)."""

from __future__ import annotations

from forge.api import ActionFailed, ExecContext
from forge.formats.common.compression import compressor_id, compressor_mismatch


def param(method: str) -> str:
    return compressor_id(method)


def check(ctx: ExecContext, method: str) -> None:
    why = compressor_mismatch(ctx.params["compressor"], method)
    if why:
        raise ActionFailed(why, hint="the compressor changed after this build was planned: "
                                     "touch forge.toml so that forge plans it again")
