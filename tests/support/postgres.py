"""A real, throwaway PostgreSQL server for tests (Debian's `postgresql` package, installed by .ci/run).

`PostgresServer` runs initdb and pg_ctl in a private temporary folder, listening on 127.0.0.1 only,
as a non-root user (PostgreSQL refuses to run as root: under root the `postgres` account the
package creates runs it). `new_database()` hands each test an empty database.
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

import psycopg

from .server_process import free_port


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is missing: install Debian's postgresql package (.ci/run does)")
    return found


class PostgresServer:
    def __init__(self) -> None:
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="ai-server-pg-"))
        self._data = self._dir / "data"
        self._user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", self._user, "--"] if self._user else []
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self._dir / "server.log"
            raise RuntimeError(f"{cmd[0]} failed: {done.stderr}{log.read_text() if log.exists() else ''}")

    def start(self) -> PostgresServer:
        if self._user:
            entry = pwd.getpwnam(self._user)
            os.chown(self._dir, entry.pw_uid, entry.pw_gid)
        self._run(_bin("initdb"), "-D", str(self._data), "-U", "test", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self._dir} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c timezone=UTC -c max_connections=200"
        )
        self._run(
            _bin("pg_ctl"),
            "-D",
            str(self._data),
            "-l",
            str(self._dir / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    def stop(self) -> None:
        try:
            self._run(_bin("pg_ctl"), "-D", str(self._data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://test@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=test dbname=postgres", autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        """Create an empty database; returns its SQLAlchemy URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database with its open connections (the database "goes away" for a server)."""
        self._admin(f"DROP DATABASE {url.rsplit('/', 1)[1]} WITH (FORCE)")
