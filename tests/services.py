"""Real services for tests, started and stopped by the test that needs them: an `mlflow server`
on a loopback port and a PostgreSQL server (Debian's `postgresql` package) in a temp directory."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

# The local servers must not be asked through a proxy.
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
LOOPBACK_ENV = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base: str, server: subprocess.Popen, log: Path, timeout_s: float = 180, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with NO_PROXY.open(base + path, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"server did not answer {path} within {timeout_s} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def serving(command: list[str], port: int, log: Path, workdir: Path, env: dict, health_path: str = "/health"):
    """Run `command` (a server on `port`) in its own process group; yields http://127.0.0.1:PORT
    once `health_path` answers, and stops the whole group afterwards."""
    with log.open("w") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=workdir,
                                  env={**os.environ, **LOOPBACK_ENV, **env},
                                  start_new_session=True)  # its own group: stopping it stops its workers
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, server, log, path=health_path)
        yield base
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


# MLflow 3's server also starts a job runner and seven huey consumer processes (GenAI jobs, which
# this project never runs); without them a server answers /health about 3x sooner on 2 busy cores.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_command(port: int, backend_store_uri: str, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1",  # one worker starts fast on a small machine
            "--backend-store-uri", backend_store_uri, "--artifacts-destination", str(workdir / "artifacts")]


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, workdir: Path):
    """`mlflow server` on a free loopback port; yields its base URL (http://127.0.0.1:PORT)."""
    port = free_port()
    command = mlflow_server_command(port, backend_store_uri, workdir)
    with serving(command, port, workdir / f"mlflow-server-{port}.log", workdir, MLFLOW_SERVER_ENV) as base:
        yield base


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, workdir: Path):
    """`mlflow models serve` of `model_uri` in this environment, on a free loopback port."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with serving(command, port, workdir / f"model-server-{port}.log", workdir,
                 {"MLFLOW_TRACKING_URI": tracking_uri}, health_path="/ping") as base:
        yield base


def postgres_bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL not found: `apt-get install -y postgresql` (Debian's package; `make test` installs it)")
    return Path(found[-1]).parent


class PostgresServer:
    """A throwaway PostgreSQL cluster run by the `postgres` user: listens on 127.0.0.1 only, on a
    free port, with its unix socket inside its own temp directory, password logins only (SCRAM)."""

    SUPERUSER = "postgres"

    def __init__(self) -> None:
        self.bin = postgres_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        shutil.chown(self.root, "postgres", "postgres")  # initdb refuses to run as root
        self.data = self.root / "data"
        self.port = free_port()
        self.superuser_password = os.urandom(12).hex()
        self.pid: int | None = None

    def _as_postgres(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *command], capture_output=True, text=True,
                              timeout=120)

    def start(self) -> "PostgresServer":
        password_file = self.root / "superuser.pw"
        password_file.write_text(self.superuser_password + "\n")
        shutil.chown(password_file, "postgres", "postgres")
        init = self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.SUPERUSER,
                                 "--auth=scram-sha-256", f"--pwfile={password_file}", "--encoding=UTF8",
                                 "--no-instructions")
        password_file.unlink()
        if init.returncode != 0:
            pytest.fail(f"initdb failed:\n{init.stdout}{init.stderr}")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root}"
        started = self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                                    "-o", options, "-w", "-t", "60", "start")
        if started.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            pytest.fail(f"pg_ctl start failed:\n{started.stdout}{started.stderr}\n{log[-3000:]}")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return self

    def stop(self) -> None:
        if self.pid is not None:
            stopped = self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30",
                                        "stop")
            if stopped.returncode != 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)  # the postmaster; its children exit with it
            self.pid = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def uri(self, user: str, password: str, database: str) -> str:
        """The URI MLflow (SQLAlchemy with psycopg 3) takes: postgresql://user:password@host:port/database."""
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, user: str, password: str) -> str:
        """A database owned by a new login role; returns its URI."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.SUPERUSER, dbname="postgres",
                             password=self.superuser_password, autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(user),
                                                                                 sql.Literal(password)))
            connection.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                             sql.Identifier(user)))
        return self.uri(user, password, name)

    def query(self, database: str, statement: str, params: tuple = ()) -> list[tuple]:
        """Rows of one SQL statement, read as the superuser straight from the database."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.SUPERUSER, dbname=database,
                             password=self.superuser_password) as connection:
            return connection.execute(statement, params).fetchall()

    def dump(self, database: str) -> bytes:
        """A plain-SQL backup of one database (`pg_dump`), as an operator would take it."""
        result = subprocess.run([str(self.bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.SUPERUSER,
                                 database], capture_output=True, env={**os.environ, "PGPASSWORD": self.superuser_password},
                                timeout=120)
        if result.returncode != 0:
            pytest.fail(f"pg_dump {database} failed: {result.stderr.decode(errors='replace')}")
        return result.stdout


@contextlib.contextmanager
def postgres_server():
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.close()


@dataclass(frozen=True)
class RayHead:
    """A `ray start --head` cluster of the tests, as the environment a driver needs to join it (its
    GCS address in RAY_ADDRESS, token mode with the cluster's own token)."""

    env: dict


def ray_client_env(base: dict, token: str) -> dict:
    """`base` with token authentication by `token` and no cluster address of its own."""
    env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR"):
        env.pop(name, None)
    return env


# `ray start` gives its raylet a fixed 30 s to register with the GCS; on 2 cores busy with other
# tests' clusters it once did not ("The current node timed out during startup"). Such a start is
# stopped and made again, from new ports.
RAY_START_ATTEMPTS = 2


def start_ray(make_command: Callable[[], tuple[list[str], dict]]) -> tuple[list[str], int]:
    """`ray start` (a head, or a node joining one) as `make_command()` -> (command, environment)
    gives it, in a process session of its own; a start that timed out during start-up is killed by
    that session and made again from a new command. Returns the command that started and its session
    id (every process of the node keeps it, the renamed and reparented ones included)."""
    from conftest import kill_session

    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        command, env = make_command()
        starter = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            out, err = starter.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            kill_session(starter.pid)
            out, err = starter.communicate()
        if starter.returncode == 0:
            return command, starter.pid
        kill_session(starter.pid)
        output = out[-2000:] + err[-2000:]
        if "timed out during startup" not in output or attempt == RAY_START_ATTEMPTS:
            pytest.fail(f"{' '.join(command[1:3])} failed (exit {starter.returncode}):\n{output}")
        print(f"{' '.join(command[1:3])} timed out during startup (attempt {attempt}); starting it again")
    raise AssertionError("unreachable")


def option_of(command: list[str], name: str) -> str:
    """The value of `--name=value` in a command line."""
    return next(arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}="))


@contextlib.contextmanager
def ray_head(num_cpus: int):
    """A one-node Ray cluster (`ray start --head`) with every port chosen free, so that heads of
    other pytest workers can start beside it, in a temp dir and a process session of its own:
    stopping it kills exactly its processes, never `ray stop`."""
    import secrets

    from conftest import kill_processes_mentioning, kill_session

    token = secrets.token_hex(32)
    temp_dirs: list[str] = []

    def head_command() -> tuple[list[str], dict]:
        temp_dirs.append(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))  # short: socket paths must fit 107 bytes
        dashboard_port = free_port()
        # The state API inside the cluster (Ray Train's controller) must find this cluster's API
        # server, not scan the machine's raylets: it reads RAY_API_SERVER_ADDRESS, which its
        # processes inherit.
        env = {**ray_client_env(os.environ, token), "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}
        return (["ray", "start", "--head", f"--port={free_port()}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
                 f"--temp-dir={temp_dirs[-1]}", "--include-dashboard=true", f"--dashboard-port={dashboard_port}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"], env)

    session = None
    try:
        command, session = start_ray(head_command)
        yield RayHead({**ray_client_env(os.environ, token), "RAY_ADDRESS": f"127.0.0.1:{option_of(command, '--port')}"})
    finally:
        if session is not None:
            kill_session(session)
        for temp_dir in temp_dirs:
            kill_processes_mentioning(temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
