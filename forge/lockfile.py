"""`forge.lock`: floating references resolved once and pinned.

    {"version": 1, "pins": {"oci": {"registry.example.com/library/alpine:3.20": "sha256:..."}}}

A rule asks for a pin during analysis (`ctx.pin(kind, key)`); the first time, the
resolver registered for `kind` answers (e.g. asks a registry for a tag's digest) and
the answer is written here, so later builds, and other machines, use the same bytes.
`forge lock` asks every resolver again. With `--offline`, a missing pin is an error.
The file is sorted and stable, meant to be committed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from forge.errors import AnalysisError, LoadError, Location
from forge.ruleset import RuleSet

LOCK_NAME = "forge.lock"


class Lockfile:
    def __init__(self, root: Path, config: dict, rules: RuleSet, *, offline: bool = False, refresh: bool = False,
                 dry: bool = False):
        self.path = root / LOCK_NAME
        self.config = config
        self.resolvers = rules.pin_resolvers
        self.placeholders = rules.pin_placeholders
        self.offline = offline
        # `--nobuild`: what is not pinned gets its kind's placeholder, resolved by no one
        self.dry = dry
        self.used_placeholder = False
        self.refresh = refresh  # `forge lock`: resolve again even what is pinned
        self.pins: dict[str, dict[str, str]] = {}
        self.dirty = False
        self._refreshed: set[tuple[str, str]] = set()
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.pins = {k: dict(v) for k, v in data.get("pins", {}).items()}
            except (ValueError, AttributeError, TypeError) as e:
                raise LoadError(f"{LOCK_NAME} is not valid: {e}", location=Location(LOCK_NAME),
                                hint="delete it and run forge lock to write it again") from None
            # A pin is a digest or a version that rules use as text: anything else is a
            # hand edit gone wrong, found here rather than deep inside a rule.
            for kind, pins in self.pins.items():
                for key, value in pins.items():
                    if not all(isinstance(x, str) for x in (kind, key, value)):
                        raise LoadError(f"{LOCK_NAME} is not valid: the pin {kind}/{key} is "
                                        f"{json.dumps(value)}, not a string",
                                        location=Location(LOCK_NAME),
                                        hint="delete it and run forge lock to write it again")

    def get(self, kind: str, key: str) -> str:
        pinned = self.pins.get(kind, {}).get(key)
        if pinned is not None and not (self.refresh and (kind, key) not in self._refreshed):
            return pinned
        if self.dry and pinned is None and kind in self.placeholders:
            self.used_placeholder = True
            return self.placeholders[kind]
        if self.offline:
            raise AnalysisError(f"'{key}' is not pinned in {LOCK_NAME} and --offline forbids "
                                "resolving it", hint="run forge lock (online) once")
        resolver = self.resolvers.get(kind)
        if resolver is None:
            raise AnalysisError(f"no resolver for pins of kind '{kind}'")
        value = resolver(key, self.config)
        self._refreshed.add((kind, key))
        if pinned != value:
            self.pins.setdefault(kind, {})[key] = value
            self.dirty = True
        return value

    def save(self) -> None:
        if not self.dirty:
            return
        data = {"version": 1, "pins": {k: dict(sorted(v.items())) for k, v in sorted(self.pins.items())}}
        tmp = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.path)
        self.dirty = False
