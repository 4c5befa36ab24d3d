"""A throwaway PostgreSQL server for tests (Debian's ``postgresql`` package, installed if missing).

PostgreSQL refuses to run as root, so under root (CI) initdb and the server run as the ``postgres``
user the package creates; the data directory lives in a world-traversable temp dir for that reason.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def ensure_installed() -> str | None:
    """Path of initdb, installing Debian's postgresql when we can (root + apt-get); None when we cannot. One
    install at a time on the machine (pytest-xdist workers ask at once; apt-get holds dpkg's lock)."""
    from filelock import FileLock

    with FileLock(os.path.join(tempfile.gettempdir(), "qlora-test-postgres-install.lock")):
        return _ensure_installed()


def _ensure_installed() -> str | None:
    if pg_bin("initdb") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], env=env, capture_output=True, timeout=600)
        if pg_bin("initdb") is None:  # stale package lists on a fresh machine
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], env=env, capture_output=True, timeout=600)
    return pg_bin("initdb")


def _as_pg(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Postgres:
    def __init__(self, port: int):
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="qlora-pg-"))
        os.chmod(self.dir, 0o755)
        self.data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")

    def start(self) -> str:
        """Start the server on 127.0.0.1:port with trust auth; returns a SQLAlchemy URL of a fresh ``mlflow`` db."""
        subprocess.run(_as_pg([pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=120)
        opts = f"-p {self.port} -h 127.0.0.1 -k {self.dir} -c fsync=off"  # fsync off: a test db, speed over durability
        subprocess.run(_as_pg([pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w",
                               "start"]), check=True, capture_output=True, timeout=120)
        import psycopg2

        for _ in range(60):
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
                break
            except psycopg2.OperationalError:
                time.sleep(0.5)
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        # +psycopg2: this SQLAlchemy defaults postgresql:// to psycopg 3, which is not a dependency.
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mlflow"

    def stop(self) -> None:
        subprocess.run(_as_pg([pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]), capture_output=True,
                       timeout=120)
        shutil.rmtree(self.dir, ignore_errors=True)
