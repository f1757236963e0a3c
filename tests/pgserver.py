"""A throw-away PostgreSQL server for the tests, started from the server binaries.

``initdb`` into a temporary directory, ``pg_ctl start`` with a unix socket in it and no TCP
(``listen_addresses=''``), trust authentication for the local superuser ``postgres``.
PostgreSQL refuses to run as root: under root (CI) the server runs as an unprivileged
user (``credbroker-test``, created when missing, else ``nobody``) that owns the directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path


def server_bin_dir() -> Path:
    """Where initdb/pg_ctl are: on PATH, else Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "initdb").exists():
            return Path(d)
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: install the "
                       "`postgresql` package (.ci/run does)")


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("credbroker-test", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


class PgServer:
    def __init__(self) -> None:
        self.bin = server_bin_dir()
        self.user = _run_as()
        self.dir = Path(tempfile.mkdtemp(prefix="cbpg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.running = False

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else list(args)

    def _chown(self) -> None:
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o755)  # noqa: S103 - the tests (root) reach the socket inside

    def init(self) -> None:
        self._chown()
        subprocess.run(self._cmd(str(self.bin / "initdb"), "-D", str(self.data), "-U",
                                 "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"),
                       check=True, capture_output=True)
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(f"listen_addresses = ''\nunix_socket_directories = '{self.dir}'\n"
                    "fsync = off\nmax_connections = 200\nshared_buffers = 16MB\n")

    def start(self) -> None:
        if not self.data.exists():
            self.init()
        subprocess.run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                                 str(self.log), "-w", "-t", "30", "start"),
                       check=True, capture_output=True)
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode,
                                 "-w", "stop"), check=False, capture_output=True)
        self.running = False

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@/{db}?host={self.dir}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
