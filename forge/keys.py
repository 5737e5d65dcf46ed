"""Action keys, their readable preimages, and the diff that explains a rebuild.

The key of an action is the xxh3-128 of its preimage: a JSON object holding the
rule type and version, the mnemonic, the command or the in-process function
with its parameters and version, the environment, the identities of host tools,
the content digest of every input (by sandbox path), the declared outputs and
the workspace's salt. Nothing host-specific (absolute paths, user, time) enters
it, so two checkouts at different paths share keys.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Mapping

import xxhash

from forge.digest import StatCache
from forge.model import Action
from forge.ruleset import ActionFunction
from forge.sandbox import KEY_ENV, SANDBOX_PATH

KEY_FORMAT = 2  # bump when the preimage's shape changes


class ToolError(Exception):
    pass


class ToolIds:
    """Host tool name -> digest of the program the sandbox PATH resolves it to, or of the
    file an absolute path names."""

    def __init__(self, stat_cache: StatCache):
        self.stat_cache = stat_cache
        self.ids: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        d = self.ids.get(name)
        if d is None:
            # An absolute path may name a data file a tool reads (a boot loader image).
            path = name if os.path.isabs(name) and os.path.isfile(name) else \
                shutil.which(name, path=SANDBOX_PATH)
            if path is None:
                raise ToolError(f"the program '{name}' is not installed (looked in {SANDBOX_PATH})")
            d = self.ids[name] = self.stat_cache.digest(os.path.realpath(path))
        return d


def static_part(action: Action, functions: Mapping[str, ActionFunction]) -> dict:
    """What the key takes from the action itself; fixed for a given plan. `functions`
    are the registered in-process steps (forge.ruleset.RuleSet.functions)."""
    p = {
        "format": KEY_FORMAT,
        "rule": action.rule,
        "mnemonic": action.mnemonic,
        "outputs": [o.path for o in action.outputs],
        "executable": list(action.executable),
    }
    if action.argv is not None:
        p["argv"] = list(action.argv)
        p["env"] = {**KEY_ENV, **dict(action.env)}
    else:
        p["function"] = f"{action.function}@{functions[action.function].version}" \
            if action.function in functions else action.function
        p["params"] = action.params
    return p


def static_digest(action: Action, functions: Mapping[str, ActionFunction]) -> str:
    """Computed once per plan and kept in the plan cache: JSON-encoding every action's
    command on every no-op build would dominate it."""
    return xxhash.xxh3_128_hexdigest(
        json.dumps(static_part(action, functions), sort_keys=True, separators=(",", ":")).encode())


def key_from(static: str, tools: dict[str, str], inputs: dict[str, str], salt: str) -> str:
    """The action key: the static digest plus everything that can change between builds."""
    h = xxhash.xxh3_128(static.encode())
    for name, d in tools.items():
        h.update(f"\0t{name}\0{d}".encode())
    for path, d in inputs.items():
        h.update(f"\0i{path}\0{d}".encode())
    h.update(f"\0s{salt}".encode())
    return h.hexdigest()


def preimage(action: Action, functions: Mapping[str, ActionFunction], inputs: dict[str, str],
             tools: dict[str, str], salt: str) -> dict:
    """The readable form of everything in the key, kept for `forge explain`."""
    return {**static_part(action, functions), "inputs": inputs, "tools": tools, "salt": salt}


def explain_diff(old: dict | None, new: dict) -> list[str]:
    """Why `new` differs from `old`, most telling reasons first."""
    if old is None:
        return ["no earlier record of this action"]
    reasons: list[str] = []
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    for path in sorted(set(oi) | set(ni)):
        a, b = oi.get(path), ni.get(path)
        if a == b:
            continue
        if a is None:
            reasons.append(f"input added: {path} ({b[:12]})")
        elif b is None:
            reasons.append(f"input removed: {path}")
        else:
            reasons.append(f"input changed: {path} ({a[:12]} -> {b[:12]})")
    labels = {"argv": "the command changed", "env": "the environment changed",
              "params": "the parameters changed", "function": "the step's version changed",
              "rule": "the rule's version changed", "tools": "a tool changed",
              "salt": "the workspace salt changed", "outputs": "the declared outputs changed",
              "executable": "the executable outputs changed", "format": "forge's key format changed",
              "mnemonic": "the mnemonic changed"}
    for field, text in labels.items():
        if old.get(field) != new.get(field):
            if field == "argv":
                text += f": {_short(old.get(field))} -> {_short(new.get(field))}"
            elif field == "env":
                oe, ne = old.get("env") or {}, new.get("env") or {}
                keys = sorted(k for k in set(oe) | set(ne) if oe.get(k) != ne.get(k))
                text += f" ({', '.join(keys)})"
            elif field == "tools":
                ot, nt = old.get("tools") or {}, new.get("tools") or {}
                text += f" ({', '.join(sorted(k for k in set(ot) | set(nt) if ot.get(k) != nt.get(k)))})"
            reasons.append(text)
    return reasons or ["the key changed but the recorded preimage is identical (cache records were lost)"]


def _short(v, n: int = 80) -> str:
    s = " ".join(v) if isinstance(v, list) else str(v)
    return repr(s if len(s) <= n else s[: n - 3] + "...")
