"""A PostgreSQL cluster of the project's own, for a Prefect server more than one person depends on.

`make server DB=postgres` runs `python -m fmnist.ops.postgres FOLDER -- prefect server start ...`: the
cluster is made once under FOLDER (`initdb`, a generated password kept in FOLDER/password, mode 0600,
never in the repository, an argument or a log), started on a free loopback port with no Unix socket,
and stopped when the command exits. The command gets the database's settings as Prefect reads them
(`PREFECT_SERVER_DATABASE_*`), the password among them, never inside a URL that a log could print.

PostgreSQL refuses to run as root: as root it runs as the `postgres` user that Debian's package makes,
who owns the cluster's data. No folder above the cluster is widened for it: where that user cannot pass
through them (a home folder of mode 0700, say), the data lives in a folder of its own under that user's
home (`CLUSTERS`/KEY, KEY from FOLDER's path), and FOLDER/data is a link to it; the password and the
log stay in FOLDER. The password file and the log are made 0600 from their first byte.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fmnist.ops.temporary_server import free_port

# A first start on a loaded 2-core machine takes a few seconds; a crash-recovery start can take longer.
POSTGRES_START_TIMEOUT_S = 60
# A fast shutdown (SIGINT) rolls back open transactions and stops at once; then SIGKILL.
POSTGRES_STOP_TIMEOUT_S = 30
DATABASE = "prefect"
USER = "prefect"
# The account PostgreSQL runs as when this runs as root.
ROOT_RUNS_AS = "postgres"
# Under that account's home: the clusters whose folder it cannot reach, one folder each.
CLUSTERS = "fashion-mnist-clusters"


class PostgresError(RuntimeError):
    """The cluster could not be made or started: the message says what was tried and what to do."""


def postgres_bin(program: str) -> str:
    """A PostgreSQL program: on PATH, or where Debian's package puts it (the newest version)."""
    if found := shutil.which(program):
        return found
    installed = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{program}"), key=lambda p: int(p.parts[-3]))
    if installed:
        return str(installed[-1])
    raise PostgresError(f"{program} not found on PATH or in /usr/lib/postgresql/*/bin: apt-get install postgresql")


@dataclass
class LocalPostgres:
    """One cluster in `folder` (data/, password, postgres.log); `start` and `stop` as often as needed."""

    folder: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def data(self) -> Path:
        """The cluster's data folder (as root, maybe a link to one under the postgres user's home)."""
        return self.folder / "data"

    @property
    def data_dir(self) -> Path:
        """The data folder itself, as PostgreSQL is given it (it cannot follow the link through FOLDER)."""
        return self.data.resolve()

    @property
    def password_file(self) -> Path:
        return self.folder / "password"

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    def prefect_env(self) -> dict[str, str]:
        """The Prefect server's settings for this database (the password included: keep it out of logs)."""
        return {
            "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
            "PREFECT_SERVER_DATABASE_HOST": "127.0.0.1",
            "PREFECT_SERVER_DATABASE_PORT": str(self.port),
            "PREFECT_SERVER_DATABASE_USER": USER,
            "PREFECT_SERVER_DATABASE_NAME": DATABASE,
            "PREFECT_SERVER_DATABASE_PASSWORD": self.password_file.read_text().strip(),
        }

    def initialise(self) -> bool:
        """Make the cluster and its database unless they exist; True if made now."""
        if (self.data / "PG_VERSION").exists():
            return False
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        account = _runs_as()
        # A half-made cluster (initdb stopped part way), or one whose folder was deleted, is started over.
        if self.data.is_symlink():
            self.data.unlink()
        elif self.data.exists():
            shutil.rmtree(self.data)
        own = _own_folder(self.folder, account)
        if own is None:
            self.data.mkdir(mode=0o700)
        else:
            if own.exists():
                shutil.rmtree(own)
            _make_owned(own / "data", account)
            self.data.symlink_to(own / "data")
            print(
                f"{account.pw_name} cannot pass through the folders above {self.folder}: the cluster's data "
                f"is in {own / 'data'} (FOLDER/data links to it)",
                file=sys.stderr,
            )
        if account:
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
        if not self.password_file.exists():
            made = self.password_file.with_suffix(".tmp")
            made.unlink(missing_ok=True)
            write_private(made, secrets.token_urlsafe(24) + "\n")
            made.replace(self.password_file)
        # initdb reads the password from a file only its account can read, removed at once.
        handed = self.data_dir.parent / "initdb-password"
        handed.unlink(missing_ok=True)
        try:
            write_private(handed, self.password_file.read_text(), account)
            self._run(
                [
                    postgres_bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    USER,
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    f"--pwfile={handed}",
                    "--no-instructions",
                ],
            )
        finally:
            handed.unlink(missing_ok=True)
        # Single-user mode makes the database before any port is open.
        self._run(
            [postgres_bin("postgres"), "--single", "-D", str(self.data_dir), "postgres"],
            stdin=f"CREATE DATABASE {DATABASE};\n",
        )
        return True

    def start(self) -> None:
        """Start the cluster on 127.0.0.1 (its last port again, if it had one: a restart keeps the URL)."""
        self.initialise()
        self.port = self.port or free_port()
        log = open_private(self.log)
        account = _runs_as()
        self.process = subprocess.Popen(
            [
                postgres_bin("postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "unix_socket_directories=",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            start_new_session=True,  # a Ctrl-C at the terminal reaches the command first; it stops this after
        )
        log.close()
        self._wait_until_ready()

    def stop(self, kill: bool = False) -> None:
        """Stop the cluster: a fast shutdown, or SIGKILL as a crash would (it recovers at the next start)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGINT)
        try:
            self.process.wait(timeout=POSTGRES_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def remove(self) -> None:
        """Stop the cluster and delete it: FOLDER, and its data folder under the postgres user's home if it has one."""
        self.stop()
        if self.data.is_symlink():
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + POSTGRES_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PostgresError(
                    f"postgres exited ({self.process.returncode}); the end of {self.log}:\n{self._tail()}"
                )
            if asyncio.run(self._answers()):
                return
            time.sleep(0.2)
        self.stop()
        raise PostgresError(
            f"postgres did not answer on 127.0.0.1:{self.port} in {POSTGRES_START_TIMEOUT_S} s:\n{self._tail()}"
        )

    async def _answers(self) -> bool:
        import asyncpg

        try:
            connection = await asyncpg.connect(
                host="127.0.0.1",
                port=self.port,
                user=USER,
                database=DATABASE,
                password=self.password_file.read_text().strip(),
                timeout=2,
            )
        except (TimeoutError, OSError, asyncpg.CannotConnectNowError):
            return False
        await connection.close()
        return True

    def _run(self, command: list[str], stdin: str = "") -> None:
        account = _runs_as()
        done = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            user=account.pw_uid if account else None,
            group=account.pw_gid if account else None,
            timeout=POSTGRES_START_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise PostgresError(
                f"{Path(command[0]).name} failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}"
            )

    def _tail(self) -> str:
        return self.log.read_text()[-2000:] if self.log.exists() else "(no log)"


def _runs_as() -> pwd.struct_passwd | None:
    """The account PostgreSQL runs as: None (this one) unless this is root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(ROOT_RUNS_AS)
    except KeyError:
        raise PostgresError(
            f"PostgreSQL refuses to run as root and there is no {ROOT_RUNS_AS!r} user: "
            "apt-get install postgresql makes one, or run as another user"
        ) from None


def write_private(path: Path, text: str, account: pwd.struct_passwd | None = None) -> None:
    """Create `path` (it must not exist) with `text`, mode 0600 from its first byte; owned by `account`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        if account:
            os.fchown(fd, account.pw_uid, account.pw_gid)
        file.write(text)


def open_private(path: Path):
    """`path` opened to append, made 0600 from its first byte (narrowed if it was wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a")


def can_reach(account: pwd.struct_passwd, folder: Path) -> bool:
    """Whether `account` may pass through every folder from / down to `folder` (its x bit for that account)."""
    groups = set(os.getgrouplist(account.pw_name, account.pw_gid))
    for above in [folder, *folder.parents]:
        st = above.stat()
        if st.st_uid == account.pw_uid:
            bit = 0o100
        elif st.st_gid in groups:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


def _own_folder(folder: Path, account: pwd.struct_passwd | None) -> Path | None:
    """Where the cluster of `folder` keeps its data when `account` cannot reach `folder` (None: in it)."""
    if account is None or can_reach(account, folder.resolve()):
        return None
    home = Path(account.pw_dir)
    if not home.is_dir() or not can_reach(account, home):
        raise PostgresError(
            f"{account.pw_name} cannot reach {folder} (a folder above it is closed to it), nor its home {home}: "
            "give the cluster a folder it can reach (make server DB=postgres PREFECT_HOME=...), or run as another user"
        )
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return home / CLUSTERS / key


def _make_owned(data: Path, account: pwd.struct_passwd) -> None:
    """Make `data` and the folders above it up to the account's home, each 0700 and the account's."""
    made = []
    for folder in [*reversed(data.parents[: len(data.relative_to(account.pw_dir).parts) - 1]), data]:
        if not folder.exists():
            folder.mkdir(mode=0o700)
            made.append(folder)
    for folder in made:
        os.chown(folder, account.pw_uid, account.pw_gid)


def main(argv: list[str] | None = None) -> int:
    """Run a command beside this folder's cluster; the cluster stops when the command ends."""
    parser = argparse.ArgumentParser(prog="python -m fmnist.ops.postgres", description=main.__doc__)
    parser.add_argument("folder", type=Path, help="the cluster's folder (made at the first start)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. prefect server start")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    cluster = LocalPostgres(args.folder)
    try:
        made = cluster.initialise()
        cluster.start()
    except PostgresError as error:
        print(f"PostgreSQL for the Prefect server: {error}", file=sys.stderr)
        return 1
    print(
        f"PostgreSQL {'made and ' if made else ''}started on 127.0.0.1:{cluster.port} "
        f"(database {DATABASE}, user {USER}, password in {cluster.password_file}); log: {cluster.log}",
        file=sys.stderr,
    )
    child = subprocess.Popen(command, env={**os.environ, **cluster.prefect_env()})
    # SIGTERM (systemctl stop) reaches the command; SIGINT (Ctrl-C) reaches it from the terminal.
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return child.wait()
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
