"""A signed Debian archive made inside a test, served over HTTP on loopback.

Keys come from the real `gpg` in a throwaway GNUPGHOME, the `Packages` index from
`dpkg-scanpackages`, the `Release` file from `apt-ftparchive release`; `InRelease` is
`gpg --clearsign` of it and `Release.gpg` `gpg --detach-sign --armor`. Each test then
breaks one thing (the key, a signed line, an index, a package, a date) to see what forge
says.
"""

from __future__ import annotations

import functools
import http.server
import lzma
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from conftest import require

TOOLS = {"gpg": "gpg", "gpgv": "gpgv", "dpkg-scanpackages": "dpkg-dev",
         "apt-ftparchive": "apt-utils", "dpkg-deb": "dpkg"}


def require_tools() -> None:
    for tool, package in TOOLS.items():
        require(shutil.which(tool) is not None, f"{tool} is not installed (apt-get install {package})")


@dataclass
class Key:
    home: Path
    fingerprint: str

    def gpg(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["gpg", "--homedir", str(self.home), "--batch", "--yes", *args],
                              check=True, capture_output=True, **kw)

    def export(self, dest: Path, armor: bool = False) -> Path:
        dest.write_bytes(self.gpg("--export", *(["--armor"] if armor else []), self.fingerprint).stdout)
        return dest


class Keys:
    """Throwaway signing keys in one short-lived GNUPGHOME (a short path: gpg-agent's
    socket name has a length limit)."""

    def __init__(self):
        require_tools()
        self.home = Path(tempfile.mkdtemp(prefix="fgpg"))
        self.home.chmod(0o700)
        self._made: dict[str, Key] = {}

    def key(self, name: str, *extra: str) -> Key:
        if name not in self._made:
            uid = f"Forge Test {name} <{name}@forge.test>"
            k = Key(self.home, "")
            k.gpg(*extra, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign",
                  "never" if not extra else "1d")
            out = k.gpg("--with-colons", "--list-keys", uid).stdout.decode()
            k.fingerprint = next(l.split(":")[9] for l in out.splitlines() if l.startswith("fpr:"))
            self._made[name] = k
        return self._made[name]

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"],
                       capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


def build_archive(root: Path, debs: list[Path], key: Key | None, *, suite: str = "bookworm",
                  inrelease: bool = True, release_gpg: bool = True, extra_fields: str = "",
                  sign_args: tuple[str, ...] = ()) -> Path:
    """`root`/debian: pool/ with the debs, dists/`suite` with Packages(.xz), Release,
    InRelease and Release.gpg as asked. Returns the archive root."""
    archive = root / "debian"
    pool = archive / "pool/main"
    pool.mkdir(parents=True, exist_ok=True)
    for d in debs:
        shutil.copy(d, pool / d.name)
    dist = archive / "dists" / suite
    bin_dir = dist / "main/binary-amd64"
    bin_dir.mkdir(parents=True, exist_ok=True)
    packages = subprocess.run(["dpkg-scanpackages", "--multiversion", "pool"], cwd=archive,
                              check=True, capture_output=True).stdout
    (bin_dir / "Packages").write_bytes(packages)
    (bin_dir / "Packages.xz").write_bytes(lzma.compress(packages))
    opts = [f"-oAPT::FTPArchive::Release::{k}={v}" for k, v in
            (("Origin", "Forge"), ("Suite", suite), ("Codename", suite),
             ("Architectures", "amd64"), ("Components", "main"))]
    text = subprocess.run(["apt-ftparchive", *opts, "release", "."], cwd=dist, check=True,
                          capture_output=True, text=True).stdout
    if extra_fields:  # after Date, before the digests: what apt-ftparchive cannot write
        head, sep, rest = text.partition("\nMD5Sum:")
        text = head + "\n" + extra_fields.strip() + sep + rest
    (dist / "Release").write_text(text)
    if key is not None and inrelease:
        key.gpg("--local-user", key.fingerprint, *sign_args, "--clearsign", "-o",
                str(dist / "InRelease"), str(dist / "Release"))
    if key is not None and release_gpg:
        key.gpg("--local-user", key.fingerprint, *sign_args, "--detach-sign", "--armor", "-o",
                str(dist / "Release.gpg"), str(dist / "Release"))
    return archive


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Server:
    """http.server in a thread, serving a directory on 127.0.0.1."""

    def __init__(self, root: Path):
        handler = functools.partial(_Quiet, directory=str(root))
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()
