"""A local PostgreSQL server started from the server binaries, for ``credbroker dev`` and tests.

``initdb`` into a directory, ``pg_ctl start`` with a unix socket in it and no TCP
(``listen_addresses=''``), trust authentication for the local superuser ``postgres`` (so a
URL carries no password). PostgreSQL refuses to run as root: under root (CI) the server
runs as an unprivileged user (``credbroker-test``, else ``nobody``) that owns the directory;
that user cannot enter a private run directory, so under root the server lives in a
temporary directory of its own (:func:`run_as` tells which).
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

from credbroker_dev.devstack import DevStackError

#: The unix socket PostgreSQL creates in its directory (port 5432).
SOCKET_NAME = ".s.PGSQL.5432"


def server_bin_dir() -> Path:
    """Where initdb/pg_ctl are: on PATH, else Debian's /usr/lib/postgresql/N/bin.

    Raises:
        DevStackError: the server binaries are not installed.
    """
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "initdb").exists():
            return Path(d)
    raise DevStackError("PostgreSQL server binaries (initdb, pg_ctl) not found: install the "
                        "`postgresql` package (Debian/Ubuntu: apt-get install postgresql) or "
                        "put its bin directory on PATH")


def run_as() -> str | None:
    """The unprivileged user the server runs as when we are root; None: as ourselves."""
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
    """One PostgreSQL server. ``start()`` (initialises on first use), ``url()``, ``stop()``.

    ``directory`` holds the data (``data/``), the socket and ``server.log``; it is kept
    across restarts. Without one, a new temporary directory is used (:meth:`destroy`
    removes it).
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.bin = server_bin_dir()
        self.user = run_as()
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix="cbpg-"))
        else:
            self.dir = directory.resolve()
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.running = False

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *args] if self.user else list(args)

    def _run(self, what: str, *args: str) -> None:
        """Raises: DevStackError with the tool's own message and the server log's end."""
        out = subprocess.run(self._cmd(*args), capture_output=True, text=True, check=False)
        if out.returncode != 0:
            try:
                log = "\n".join(self.log.read_text(errors="replace").splitlines()[-10:])
            except OSError:
                log = ""
            raise DevStackError(f"PostgreSQL {what} failed in {self.dir} (exit "
                                f"{out.returncode}): {(out.stderr or out.stdout).strip()}"
                                + (f"\nits log {self.log} ends:\n{log}" if log else ""))

    def _chown(self) -> None:
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            os.chmod(self.dir, 0o755)  # noqa: S103 - we (root) reach the socket inside

    def init(self) -> None:
        """Raises: DevStackError (initdb failed)."""
        self._chown()
        self._run("initdb", str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(f"listen_addresses = ''\nunix_socket_directories = '{self.dir}'\n"
                    "fsync = off\nmax_connections = 200\nshared_buffers = 16MB\n")

    def start(self) -> None:
        """Raises: DevStackError (it did not start within 30 s, e.g. one is still running
        on this directory)."""
        if not (self.data / "PG_VERSION").exists():
            self.init()
        self._run("start (is a server from an earlier run still using this directory? "
                  f"`{self.bin / 'pg_ctl'} -D {self.data} stop`)",
                  str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "30", "start")
        self.running = True

    def stop_command(self, mode: str = "fast") -> list[str]:
        """The command that stops this server (``pg_ctl stop -m MODE``, waiting)."""
        return self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                         "stop")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m MODE``; waits until the server is gone. Never raises."""
        subprocess.run(self.stop_command(mode), check=False, capture_output=True)
        self.running = False

    def postmaster_pid(self) -> int | None:
        """The server's process id while it runs (from ``postmaster.pid``), else None."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def url(self, db: str = "postgres") -> str:
        """A libpq URL for ``db`` over the unix socket (no password: trust authentication)."""
        return f"postgresql://postgres@/{db}?host={self.dir}"

    def ensure_database(self, name: str) -> str:
        """Create database ``name`` unless it exists; returns its URL.

        Raises: psycopg.Error (the server is not reachable).
        """
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        return self.ensure_database("t_" + uuid.uuid4().hex[:12])

    def destroy(self) -> None:
        """Stop at once and remove the directory (for a throw-away server)."""
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
