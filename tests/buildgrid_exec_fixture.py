"""A real remote-execution service for tests: PostgreSQL, BuildGrid's scheduler, forge workers.

BuildGrid's `!sql-scheduler` refuses sqlite, so `start_postgres()` runs Debian's
PostgreSQL from a temporary data directory: initdb and the server as an unprivileged user
(`nobody` when the tests run as root, since PostgreSQL will not run as root), on a free
loopback port, trust authentication (loopback only). `start_exec_buildgrid(base, db)` applies
BuildGrid's schema (`bgd migrate apply URI`) and starts `bgd server start` serving, for
instance "main": Execution + Operations + Bots (`!execution`), CAS, ByteStream and the
action cache, with a dynamic property set matching `docker` and `pool` (tests give their
workers a pool of their own, so that no other worker takes their leases). The bot keepalive is short
(KEEPALIVE seconds) so that a killed worker's lease is requeued within a test's patience.

`start_worker(grid, work_dir, platform=, concurrency=, name=)` starts one `forge worker`
process against it (killed when the grid stops, if the test did not). The session-scoped
`exec_grid` fixture is the shared PostgreSQL + BuildGrid, without workers: tests start the
ones they need. `grid.restart()` kills bgd and starts it again on the same port and data.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from buildgrid_fixture import bgd_binary
from conftest import require, wait_for_port
from registry_fixture import free_port

KEEPALIVE = 12  # seconds without news from a bot before BuildGrid requeues its leases

CONFIG = """
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
authorization:
  method: none
monitoring:
  enabled: false

connections:
  - !sql-connection &sql
    connection-string: {db}
    pool-size: 8
    max-overflow: 8

storages:
  - !disk-storage &cas
    path: {base}/cas

caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: false

schedulers:
  - !sql-scheduler &scheduler
    sql: *sql
    storage: *cas
    action-cache: *ac
    property-set: !dynamic-property-set
      # pool: tests give their workers a pool of their own, so no other worker takes their leases
      match-property-keys: [docker, pool]
    bot-session-keepalive-timeout: {keepalive}
    session-expiry-timer-interval: 1
    max-job-attempts: 5
    poll-interval: 0.2

instances:
  - name: {instance}
    services:
      - !execution
        scheduler: *scheduler
        operation-stream-keepalive-timeout: 1
      - !action-cache
        cache: *ac
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas

thread-pool-size: 64
"""


def pg_bin(tool: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"))
    return found[-1] if found else shutil.which(tool)


@dataclass
class Postgres:
    data: Path
    port: int
    as_user: list[str]

    @property
    def uri(self) -> str:
        # psycopg2 by name: SQLAlchemy 2.1 picks psycopg 3 for postgresql://, and BuildGrid's
        # LISTEN/NOTIFY (how a bot learns of a lease, a client of its result) needs psycopg2;
        # with psycopg 3 it fails and everything waits for the next poll timeout (~10 s).
        return f"postgresql+psycopg2://bgd@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        subprocess.run([*self.as_user, pg_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)


def _unprivileged() -> tuple[list[str], int | None, int | None]:
    if os.geteuid() != 0:
        return [], None, None
    # setpriv (util-linux) rather than runuser: no PAM session, works without a login shell.
    return (["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"], 65534, 65534)


@contextmanager
def start_postgres():
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    require(initdb is not None and pg_ctl is not None,
            "PostgreSQL is not installed (apt-get install postgresql)")
    as_user, uid, gid = _unprivileged()
    # Its own top directory under /tmp: the unprivileged user cannot enter pytest's (0700).
    top = Path(tempfile.mkdtemp(prefix="forge-pg-"))
    data = top / "data"
    if uid is not None:
        os.chown(top, uid, gid)
    port = free_port()
    init = subprocess.run([*as_user, initdb, "-D", str(data), "-U", "bgd", "--auth=trust",
                           "--encoding=UTF8", "--no-locale", "--no-sync"],
                          capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
    opts = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={top} "
            "-c fsync=off -c synchronous_commit=off -c max_connections=200")
    pg = Postgres(data, port, as_user)
    start = subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(top / "pg.log"),
                            "-o", opts, "-w", "-t", "120", "start"],
                           capture_output=True, text=True, timeout=180)
    try:
        log = top / "pg.log"
        assert start.returncode == 0, (f"pg_ctl start failed:\n{start.stdout}\n{start.stderr}\n"
                                       + (log.read_text()[-3000:] if log.exists() else ""))
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(top, ignore_errors=True)


@dataclass
class ExecGrid:
    url: str
    instance: str
    base: Path
    port: int
    db: Postgres
    config: Path
    proc: subprocess.Popen | None = None
    workers: list = field(default_factory=list)

    def start(self) -> None:
        log = self.base / "bgd.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen([bgd_binary(), "server", "start", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.base)
        wait_for_port(self.port, self.proc, seconds=120, what="BuildGrid (execution)",
                      output=lambda: log.read_text()[-4000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Kill the server and start it again on the same port, database and CAS."""
        self.kill()
        self.start()

    def log(self) -> str:
        return (self.base / "bgd.log").read_text(errors="replace")


@contextmanager
def start_exec_buildgrid(base: Path, db: Postgres, instance: str = "main"):
    binary = bgd_binary()
    require(binary is not None, "BuildGrid is not installed (pip install buildgrid)")
    base.mkdir(parents=True, exist_ok=True)
    (base / "cas").mkdir(exist_ok=True)
    migrate = subprocess.run([binary, "migrate", "apply", db.uri], capture_output=True,
                             text=True, timeout=300, cwd=base)
    assert migrate.returncode == 0, f"bgd migrate apply failed:\n{migrate.stdout}\n{migrate.stderr}"
    port = free_port()
    config = base / "bgd.yml"
    config.write_text(CONFIG.format(port=port, db=db.uri, base=base, instance=instance,
                                    keepalive=KEEPALIVE))
    grid = ExecGrid(f"grpc://127.0.0.1:{port}", instance, base, port, db, config)
    try:
        grid.start()
        yield grid
    finally:
        for w in grid.workers:
            w.kill()
        grid.kill()


@dataclass
class Worker:
    proc: subprocess.Popen
    work_dir: Path
    log_path: Path
    name: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 60) -> int:
        os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def worker_argv(grid: ExecGrid, work_dir: Path, *, platform: dict[str, str] | None = None,
                concurrency: int = 1, name: str = "") -> list[str]:
    argv = [sys.executable, "-m", "forge", "worker", "--executor", grid.url,
            "--instance", grid.instance, "--concurrency", str(concurrency),
            "--work-dir", str(work_dir)]
    for key, value in (platform or {}).items():
        argv += ["--platform", f"{key}={value}"]
    if name:
        argv += ["--name", name]
    return argv


def start_worker(grid: ExecGrid, work_dir: Path, *, platform: dict[str, str] | None = None,
                 concurrency: int = 1, name: str = "", env: dict | None = None) -> Worker:
    """One `forge worker` process; it is killed when the grid stops if the test does not."""
    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir.parent / f"{work_dir.name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(worker_argv(grid, work_dir, platform=platform,
                                            concurrency=concurrency, name=name),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    w = Worker(proc, work_dir, log, name or work_dir.name)
    grid.workers.append(w)
    return w


def wait_until(predicate, seconds: float, what: str, detail=lambda: "") -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}\n{detail()}")


@pytest.fixture(scope="session")
def exec_grid(tmp_path_factory):
    with start_postgres() as db:
        with start_exec_buildgrid(tmp_path_factory.mktemp("exec-grid"), db) as grid:
            yield grid
