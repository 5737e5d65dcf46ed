"""The workspace: its root (the nearest directory holding `forge.toml`), its
configuration, and where its cache and records live."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from forge.errors import Location, LoadError, UsageError, did_you_mean

CONFIG_NAME = "forge.toml"
BUILD_NAMES = ("BUILD", "BUILD.forge")
OUT_DIR = "forge-out"
# Directories never scanned for packages: outputs, VCS metadata, environments.
SKIP_DIRS = frozenset({OUT_DIR, ".git", ".hg", ".svn", "node_modules", "__pycache__", ".venv"})

# Known keys of forge.toml, so that a typo is an error and not silently ignored.
_KNOWN = {
    "": {"salt", "jobs", "cache", "registries", "debian", "qemu", "remote", "sign",
         "provenance"},
    "cache": {"dir"},
    "remote": {"cache", "instance", "upload", "timeout", "jobs", "ca_cert"},  # forge.remote
    "registries": {"insecure", "mirrors", "ca_cert"},  # read by the image rules (rules/oci.py)
    "debian": {"mirror", "keyring", "insecure"},  # read by the Debian rules (rules/debian.py)
    "qemu": {"accel"},  # read by forge run and qemu_test (rules/qemu.py)
    "sign": {"key"},  # read by forge.signing after a build
    "provenance": {"builder_id"},  # forge.provenance
}

# Settings that turn a check off. Every build says so (forge.cli), so that a setting made
# once to get past a problem is never forgotten.
_WEAKENING = {
    ("debian", "insecure"): "[debian] insecure = true in {config}: Debian Release signatures are "
                            "NOT verified, so whoever answers for the mirror chooses the packages "
                            "forge pins into forge.lock; remove it to verify them again",
}


def weakened_checks(config: dict) -> list[str]:
    """Warnings for the settings of `config` that turn a check off."""
    return [text.format(config=CONFIG_NAME) for (section, key), text in _WEAKENING.items()
            if config.get(section, {}).get(key) is True]


@dataclass
class Workspace:
    root: Path
    config: dict = field(default_factory=dict)

    @property
    def salt(self) -> str:
        return str(self.config.get("salt", ""))

    @property
    def out_dir(self) -> Path:
        return self.root / OUT_DIR

    def cache_dir(self, override: str | None = None) -> Path:
        """`--cache-dir`, then FORGE_CACHE_DIR, then `[cache] dir`, then ~/.cache/forge."""
        if override:
            return Path(override).expanduser().absolute()
        env = os.environ.get("FORGE_CACHE_DIR")
        if env:
            return Path(env).expanduser().absolute()
        configured = self.config.get("cache", {}).get("dir")
        if configured:
            path = Path(configured).expanduser()
            return path if path.is_absolute() else (self.root / path).absolute()
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "forge"

    def jobs(self, override: int | None = None) -> int:
        """How many actions (and tests) run at once: `--jobs`, then `jobs` in forge.toml,
        then the number of cores."""
        try:
            configured = int(self.config.get("jobs") or 0)
        except (TypeError, ValueError):
            raise UsageError(f"jobs in {CONFIG_NAME} must be a number; got "
                             f"{self.config['jobs']!r}") from None
        return max(1, override or configured or os.cpu_count() or 1)

    def records_dir(self, cache_dir: Path) -> Path:
        """This workspace's own records (last build, explain data) inside the cache."""
        wid = xxhash.xxh3_64_hexdigest(str(self.root).encode())
        return cache_dir / "workspaces" / wid

    def package_of(self, path: Path) -> str:
        """The package holding `path`: its nearest ancestor with a BUILD file."""
        path = path.absolute()
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return ""
        parts = list(rel.parts)
        while parts:
            if any((self.root.joinpath(*parts) / b).is_file() for b in BUILD_NAMES):
                return "/".join(parts)
            parts.pop()
        return ""


def build_file(directory: Path) -> Path | None:
    for name in BUILD_NAMES:
        p = directory / name
        if p.is_file():
            return p
    return None


def find_workspace(start: Path | None = None) -> Workspace:
    start = (start or Path.cwd()).absolute()
    for d in (start, *start.parents):
        cfg = d / CONFIG_NAME
        if cfg.is_file():
            return Workspace(d, load_config(cfg, CONFIG_NAME))
    raise UsageError(
        f"not inside a forge workspace: no {CONFIG_NAME} in {start} or any parent directory",
        hint=f"create an empty {CONFIG_NAME} at the root of your workspace")


def load_config(path: Path, display: str | None = None) -> dict:
    display = display or str(path)
    try:
        data = tomllib.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise LoadError(f"{CONFIG_NAME} is not UTF-8 text (TOML must be): byte "
                        f"{e.object[e.start]:#04x} at offset {e.start}",
                        location=Location(display, e.object.count(b"\n", 0, e.start) + 1)) from None
    except tomllib.TOMLDecodeError as e:
        line, col = getattr(e, "lineno", 0), getattr(e, "colno", 0)
        msg = str(e).split(" (at line")[0]
        raise LoadError(f"{CONFIG_NAME} is not valid TOML: {msg}",
                        location=Location(display, line, col)) from None
    for section, known in _KNOWN.items():
        table = data if not section else data.get(section, {})
        if not isinstance(table, dict):
            raise LoadError(f"'{section}' in {CONFIG_NAME} must be a table",
                            location=Location(display))
        for key in table:
            if key not in known:
                where = f"[{section}] " if section else ""
                raise LoadError(f"unknown key {where}'{key}' in {CONFIG_NAME}",
                                location=Location(display, _line_of(path, key)),
                                hint=did_you_mean(key, known))
    for section, key in _WEAKENING:
        value = data.get(section, {}).get(key)
        if value is not None and not isinstance(value, bool):
            raise LoadError(f"[{section}] {key} in {CONFIG_NAME} must be true or false; got {value!r}",
                            location=Location(display, _line_of(path, key)))
    return data


def _line_of(path: Path, key: str) -> int:
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith(key):
            return n
    return 0


def discover_packages(ws: Workspace, under: str = "") -> tuple[list[str], dict[str, int]]:
    """All packages at or below `under`, and the mtimes of every directory walked.

    A directory holding its own forge.toml is another workspace and is skipped.
    The directory mtimes let a later run tell cheaply that no package appeared.
    """
    packages: list[str] = []
    dir_mtimes: dict[str, int] = {}
    start = ws.root / under if under else ws.root
    stack = [start]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
            entries = list(os.scandir(d))
        except OSError:
            continue
        rel = d.relative_to(ws.root).as_posix()
        rel = "" if rel == "." else rel
        dir_mtimes[rel] = st.st_mtime_ns
        names = {e.name for e in entries}
        if d != ws.root and CONFIG_NAME in names:
            continue
        if any(b in names and (d / b).is_file() for b in BUILD_NAMES):
            packages.append(rel)
        for e in entries:
            if e.is_dir(follow_symlinks=False) and e.name not in SKIP_DIRS and not e.name.startswith("."):
                stack.append(Path(e.path))
    packages.sort()
    return packages, dir_mtimes
