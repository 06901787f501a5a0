"""`flywheel server`: a real PostgreSQL + `mlflow server` on 127.0.0.1, and every stage through it.

One team server per module (~20 s to start: MLflow migrates the schema); a second one with basic-auth and an
S3 artifact store (moto in server mode) for the object-store, auth and network-fault tests. Finalizers stop
every process the tests started, also when a test fails. Clients get only `MLFLOW_TRACKING_URI` (and, for the
auth server, MLflow's username/password variables): no storage credentials, so artifacts must travel through
the server's proxy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from flywheel.pipelines import server
from tests.pipelines.test_gate import identities, results_file

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-Flywheel-admin-x7Q2"
STORAGE_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL", server.PASSWORD_ENV,
                "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

pytestmark = pytest.mark.skipif(shutil.which("pg_ctl") is None, reason="no system PostgreSQL (pg_ctl) on PATH")


def _server_dir() -> Path:
    # Not under pytest's tmp_path: that is 0700, and as root the cluster belongs to `postgres`, who must reach it.
    d = Path(tempfile.mkdtemp(prefix="flywheel-server-"))
    d.chmod(0o755)
    return d


def _remove(d: Path) -> None:
    server.stop(d, log=lambda _m: None)
    shutil.rmtree(d, ignore_errors=True)


def _start(d: Path, **kw) -> dict:
    # A failed start ends what it started itself (tested through --auth without a password below).
    return server.start(server.ServerConfig(dir=str(d), port=0, pg_port=0, workers=2, **kw), log=lambda _m: None)


@pytest.fixture(scope="module")
def team():
    d = _server_dir()
    try:
        state = _start(d)
        yield {"dir": d, "url": state["mlflow"]["url"], "state": state}
    finally:
        _remove(d)
    # `stop` ends the server's whole session: the job consumers `mlflow server` starts do not outlive it.
    from tests.pipelines.test_server_embedded import _left_in_session

    assert _left_in_session(state["mlflow"]["pid"]) == []


def client_env(url: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STORAGE_VARS}
    # Few, fast retries: a stopped server must fail in seconds, not after MLflow's default minutes of backoff.
    env.update({"MLFLOW_TRACKING_URI": url, "FLYWHEEL_HOME": str(home), "OMP_NUM_THREADS": "1",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", **extra})
    return env


def flywheel(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flywheel.pipelines", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _client(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


# -- the server itself ---------------------------------------------------------------------------------------

def test_status_and_loopback_only(team):
    import psutil

    s = server.status(team["dir"])
    assert s["mlflow"] and s["healthy"] and s["postgres"] and s["postgres_which"] == "system"
    ports = {team["state"]["mlflow"]["port"], team["state"]["postgres"]["port"]}
    listening = [c for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port in ports]
    assert {c.laddr.port for c in listening} == ports
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
    out = flywheel(dict(os.environ), "server", "status", "--dir", str(team["dir"]), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["healthy"] is True


def test_stop_ends_exactly_what_start_started():
    d = _server_dir()
    pg = server.start_postgres(d, server.free_port())  # PostgreSQL alone: cheap, the same stop path as `stop`
    assert server.alive(pg) and pg["which"] == "system"
    server.stop_postgres(pg)
    assert not server.alive(pg) and not (d / "pg" / "data" / "postmaster.pid").exists()
    shutil.rmtree(d)
    # `stop` with no state is a message, not an error, and signals nothing.
    said: list[str] = []
    assert server.stop(d, log=said.append) is False and "nothing to stop" in said[0]


def test_auth_without_password_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv(server.PASSWORD_ENV, raising=False)
    out = flywheel(dict(os.environ), "server", "start", "--auth", f"dir={tmp_path}", "port=0", "pg_port=0")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"error: --auth needs the admin password in the {server.PASSWORD_ENV} environment variable"
    assert not (tmp_path / "pg").exists()  # refused before anything started


# -- every stage through the server --------------------------------------------------------------------------

@pytest.mark.slow
def test_every_stage_through_the_server(team, tmp_path, monkeypatch):
    from flywheel.mining.demo_logs import write_demo_logs

    url = team["url"]
    env = client_env(url, tmp_path / "home")
    write_demo_logs(tmp_path / "logs" / "demo.jsonl", n=120, seed=0)

    mined = flywheel(env, "mine", str(tmp_path / "logs"), "--out", str(tmp_path / "ds"))
    assert mined.returncode == 0, mined.stderr[-2000:]
    train = flywheel(env, "train", f"dataset={tmp_path / 'ds'}", f"output_dir={tmp_path / 'train'}", "max_steps=2",
                     "batch_size=2", "max_length=256", "eval_every=0", "save_every=2", "max_train_examples=8",
                     "generations=0", "backend=trl")
    assert train.returncode == 0, train.stderr[-2000:]
    cl = _client(url)
    train_run = cl.search_runs([cl.get_experiment_by_name("flywheel/train").experiment_id])[0]
    # The re-gated results must name what is promoted (the gate refuses evidence about other weights).
    from flywheel.foundation.io import sha256_file

    adapter = tmp_path / "train" / "adapter"
    meta = json.loads((adapter / "flywheel_adapter.json").read_text())
    evidence = results_file(tmp_path, targets=identities(candidate=sha256_file(adapter / "adapter_model.safetensors"),
                                                         base=meta["base_model_sha256"]))
    gate = flywheel(env, "gate", "--candidate", train_run.info.run_id, "--results", evidence,
                    "--promote", f"out={tmp_path / 'gate'}", "model_name=flywheel-demo")
    assert gate.returncode == 0, gate.stdout[-1500:] + gate.stderr[-1500:]
    pub = flywheel(env, "publish", "models:/flywheel-demo@champion", "mode=adapter", "base=ollama", "gguf_adapter=false",
                   "--out", str(tmp_path / "mf"))
    assert pub.returncode == 0, pub.stderr[-2000:]
    assert (tmp_path / "mf" / "adapter" / "adapter_model.safetensors").exists()
    hist = flywheel(env, "history", "flywheel-demo", "--json")
    assert hist.returncode == 0, hist.stderr[-2000:]
    rows = json.loads(hist.stdout)
    assert rows[0]["version"] == "1" and rows[0]["current"] and rows[0]["train_run"] == train_run.info.run_id

    # Artifacts went through the proxy into the server's store; nothing was written to a client-side store.
    arts = team["dir"] / "artifacts"
    assert list(arts.rglob("adapter_model.safetensors")) and list(arts.rglob("manifest.json"))
    assert not (tmp_path / "home" / "mlflow.db").exists() and not (tmp_path / "home" / "artifacts").exists()

    # The dashboard's store reads the same server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    from flywheel.dashboard import store

    mine_runs = store.runs("mine")
    assert mine_runs and store.artifact_json(mine_runs[0]["run_id"], "manifest.json")["counts"]["kept"] > 0
    champ = store.champions()
    assert [(c["name"], c["version"]) for c in champ] == [("flywheel-demo", "1")]


# -- many writers at once ------------------------------------------------------------------------------------

WRITER = """
import os, sys, tempfile
import mlflow
from flywheel.pipelines import tracking
w = int(sys.argv[1])
with tempfile.TemporaryDirectory() as tmp:
    for i in range(25):
        with tracking.start_run("concurrency", f"w{w}-r{i}", tags={"writer": w}, params={"i": i}):
            for step in range(4):
                tracking.log_metrics({f"m{k}": w + i + step + k for k in range(10)}, step=step)
            p = os.path.join(tmp, "out.txt")
            open(p, "w").write(f"writer {w} run {i}")
            mlflow.log_artifact(p)
"""


@pytest.mark.slow
def test_eight_writers_at_once(team, tmp_path):
    env = client_env(team["url"], tmp_path / "home", MLFLOW_HTTP_REQUEST_MAX_RETRIES="3")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(w)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in range(8)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    errors = [(p.returncode, err[-800:]) for p, (_, err) in zip(procs, outs) if p.returncode != 0]
    assert errors == []
    cl = _client(team["url"])
    exp = cl.get_experiment_by_name("flywheel/concurrency").experiment_id
    runs = cl.search_runs([exp], max_results=1000)
    assert len(runs) == 200 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.info.run_name for r in runs} == {f"w{w}-r{i}" for w in range(8) for i in range(25)}
    assert all(len(r.data.metrics) == 10 for r in runs)
    assert len(cl.get_metric_history(runs[0].info.run_id, "m3")) == 4
    for r in runs[:: 20]:  # downloading all 200 would only test the disk
        w, i = r.data.tags["writer"], r.data.params["i"]
        path = cl.download_artifacts(r.info.run_id, "out.txt", str(tmp_path / r.info.run_id))
        assert Path(path).read_text() == f"writer {w} run {i}"
    files = list((team["dir"] / "artifacts").glob(f"{exp}/*/artifacts/out.txt"))
    assert len(files) == 200


# -- S3 artifacts, basic-auth, and a server that goes away ---------------------------------------------------

@pytest.fixture(scope="module")
def moto():
    import boto3

    port = server.free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        s3 = boto3.client("s3", endpoint_url=creds["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        for _ in range(100):
            try:
                s3.create_bucket(Bucket="flywheel")
                break
            except Exception:
                time.sleep(0.2)
        yield {"s3": s3, "env": creds}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def secure(moto):
    """Basic-auth + S3 artifacts. Storage credentials and the admin password reach the server process only."""
    d = _server_dir()
    with pytest.MonkeyPatch.context() as mp:  # the server inherits them; the test process keeps none
        for k, v in {**moto["env"], server.PASSWORD_ENV: PASSWORD}.items():
            mp.setenv(k, v)
        state = _start(d, auth=True, artifacts="s3://flywheel/mlflow")
    try:
        yield {"dir": d, "url": state["mlflow"]["url"]}
    finally:
        _remove(d)


@pytest.mark.slow
def test_auth_refuses_anonymous_and_artifacts_land_in_s3(secure, moto, tmp_path, monkeypatch):
    url = secure["url"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert e.value.code == 401

    from flywheel.mining.demo_logs import write_demo_logs

    write_demo_logs(tmp_path / "logs" / "demo.jsonl", n=60, seed=1)
    anon = flywheel(client_env(url, tmp_path / "home"), "mine", str(tmp_path / "logs"), "--out", str(tmp_path / "a"))
    assert anon.returncode == 2 and "Traceback" not in anon.stderr
    assert f"MLflow tracking server at {url} refused the credentials" in anon.stderr

    env = client_env(url, tmp_path / "home", MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
    mined = flywheel(env, "mine", str(tmp_path / "logs"), "--out", str(tmp_path / "ds"))
    assert mined.returncode == 0, mined.stderr[-2000:]
    keys = [o["Key"] for o in moto["s3"].list_objects_v2(Bucket="flywheel", Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith("/artifacts/manifest.json") for k in keys), keys

    # The password is nowhere in what MLflow or Flywheel recorded.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    cl = _client(url)
    run = cl.search_runs([cl.get_experiment_by_name("flywheel/mine").experiment_id])[0]
    assert PASSWORD not in json.dumps([run.data.params, run.data.tags])
    for f in secure["dir"].glob("*"):
        if f.is_file():
            assert PASSWORD not in f.read_text(errors="replace"), f
    assert PASSWORD not in mined.stdout + mined.stderr


@pytest.mark.slow
def test_stopped_server_is_one_line_error_naming_the_uri(secure, tmp_path):
    from flywheel.mining.demo_logs import write_demo_logs

    url = secure["url"]
    env = client_env(url, tmp_path / "home", MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
    write_demo_logs(tmp_path / "logs" / "demo.jsonl", n=60, seed=2)
    stop = flywheel(dict(os.environ), "server", "stop", "--dir", str(secure["dir"]))
    assert stop.returncode == 0 and "stopped" in stop.stdout
    s = server.status(secure["dir"])
    assert not s["mlflow"] and not s["postgres"] and not s["healthy"]
    # The mine stage does its work, then finds the server gone when it logs the run.
    for args in (["mine", str(tmp_path / "logs"), "--out", str(tmp_path / "ds")], ["history", "flywheel-demo"]):
        out = flywheel(env, *args, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1] == (
            f"error: cannot reach the MLflow tracking server at {url} (is it running? `flywheel server status`)")
        assert "Traceback" not in out.stderr


# -- the server dies in the middle of a promotion ------------------------------------------------------------

@pytest.fixture(scope="module")
def crashy():
    """A server of its own: these tests SIGKILL it and start it again on the same folder (same PostgreSQL data,
    same ports, so the clients' URI stays valid)."""
    d = _server_dir()
    try:
        state = _start(d)
        yield {"dir": d, "url": state["mlflow"]["url"], "port": state["mlflow"]["port"],
               "pg_port": state["postgres"]["port"]}
    finally:
        _remove(d)


def _kill_mlflow(d: Path) -> None:
    """SIGKILL the MLflow server's process group (it runs in its own session), as a crash or the OOM killer would."""
    import signal

    pid = server.read_state(d)["mlflow"]["pid"]
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.healthy(f"http://127.0.0.1:{server.read_state(d)['mlflow']['port']}") and time.monotonic() < deadline:
        time.sleep(0.1)


def _server_env(monkeypatch, url: str, home: Path) -> None:
    """This process as a client of `url`, failing fast once the server is gone."""
    for k, v in {"MLFLOW_TRACKING_URI": url, "FLYWHEEL_HOME": str(home), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    from flywheel.pipelines import tracking

    tracking.setup()


def _lease_seen(url: str, name: str) -> bool:
    from flywheel.pipelines import tags as T

    q = urllib.parse.urlencode({"name": name})
    try:
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/registered-models/get?{q}", timeout=5) as r:
            model = json.load(r)["registered_model"]
    except (urllib.error.URLError, OSError, KeyError):
        return False
    return any(t["key"] == T.PROMOTION_LEASE and '"owner": null' not in t["value"] for t in model.get("tags", []))


@pytest.mark.slow
def test_server_killed_during_gate_promote(crashy, tmp_path, monkeypatch):
    """`flywheel gate --promote` while the server is SIGKILLed: exit 2 naming the URI, nothing half-promoted; after
    `flywheel server start` on the same folder the same command promotes, with exactly one history entry.

    The window: a promotion on a server takes the registry lease and waits SETTLE_SECONDS (1 s) before it writes
    anything else, so killing the server as soon as the lease tag is visible lands before the version exists.
    Kills later in the promotion (around the alias move) are made exact in the test below."""
    from flywheel.pipelines import registry
    from tests.pipelines.test_gate import fake_adapter_run

    url, d, name = crashy["url"], crashy["dir"], "crash-gate"
    _server_env(monkeypatch, url, tmp_path / "home")
    run_id = fake_adapter_run(tmp_path)
    evidence = results_file(tmp_path, targets=identities())
    args = ["gate", "--candidate", run_id, "--results", evidence, "--promote", f"model_name={name}",
            f"out={tmp_path / 'gate'}"]
    env = client_env(url, tmp_path / "home")
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.pipelines", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _lease_seen(url, name):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        _kill_mlflow(d)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 2, out[-1500:] + err[-1500:]
    assert err.strip().splitlines()[-1] == (
        f"error: cannot reach the MLflow tracking server at {url} (is it running? `flywheel server status`)")
    assert "Traceback" not in err and not (tmp_path / "gate").exists()
    assert not list(tmp_path.glob(".gate-eval-*"))  # its staging folder went with it

    start = flywheel(dict(os.environ), "server", "start", f"dir={d}", f"port={crashy['port']}",
                     f"pg_port={crashy['pg_port']}", "workers=2")
    assert start.returncode == 0, start.stderr[-2000:]
    assert registry.champion(name) is None and registry.history(name) == []  # nothing half-promoted

    # The dead gate's lease names a process that no longer exists: taken over at once, not after its expiry.
    again = flywheel(env, *args, timeout=300)
    assert again.returncode == 0, again.stdout[-1500:] + again.stderr[-1500:]
    rows = registry.history(name)
    assert len(rows) == 1 and rows[0]["current"] and rows[0]["until"] is None
    assert rows[0]["version"] == str(registry.champion(name).version)
    assert not any(registry.TAG_PENDING in (mv.tags or {}) for mv in _client(url).search_model_versions(
        f"name = '{name}'"))


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
def test_server_killed_around_the_alias_move(crashy, tmp_path, monkeypatch, when):
    """The kill exactly before / after the alias move (the commit point): before, the new version is pending and
    no history shows it; after, the history shows it as champion at once. The next promotion repairs either:
    the orphan is deleted, or the dead promotion's history is written and its interval closed."""
    from mlflow.tracking import MlflowClient

    from flywheel.pipelines import registry
    from tests.pipelines.test_gate import fake_adapter_run

    url, d, name = crashy["url"], crashy["dir"], f"crash-{when}"
    _server_env(monkeypatch, url, tmp_path / "home")
    first = registry.resolve_model(fake_adapter_run(tmp_path, weights=b"\1", name="first"))
    second = registry.resolve_model(fake_adapter_run(tmp_path, weights=b"\2", name="second"))
    real = MlflowClient.set_registered_model_alias

    def kill_around_the_move(self, *a, **kw):
        if when == "after":
            real(self, *a, **kw)
        _kill_mlflow(d)
        return real(self, *a, **kw)  # the server is gone: this raises

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", kill_around_the_move)
    with pytest.raises(Exception) as e:
        registry.promote_new(name, first, expected=None, gate_run_id="dead-gate")
    assert server.connection_error(e.value, url) is not None
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    server.start(server.ServerConfig(dir=str(d), port=crashy["port"], pg_port=crashy["pg_port"], workers=2),
                 log=lambda _m: None)

    rows = registry.history(name)
    if when == "before":
        assert registry.champion(name) is None and rows == []
    else:
        assert [(r["version"], r["gate_run"], r["current"]) for r in rows] == [("1", "dead-gate", True)]
    registry.promote_new(name, second, expected=None if when == "before" else "1", gate_run_id="next-gate")
    versions = _client(url).search_model_versions(f"name = '{name}'")
    assert not any(registry.TAG_PENDING in (mv.tags or {}) for mv in versions)
    rows = registry.history(name)
    if when == "before":
        assert [str(mv.version) for mv in versions] == ["2"]  # the never-served v1 is gone
        assert [(r["version"], r["gate_run"], r["current"]) for r in rows] == [("2", "next-gate", True)]
    else:
        assert [(r["version"], r["gate_run"], r["current"]) for r in rows] == [("1", "dead-gate", False),
                                                                                ("2", "next-gate", True)]
        assert rows[0]["until"] == rows[1]["since"]


def test_config_file_first_line_is_its_command():
    from flywheel.pipelines.config import load_config

    assert open(ROOT / "configs/server.yaml", encoding="utf-8").readline().startswith(
        "# Run with: flywheel server start --config configs/server.yaml")
    cfg = load_config(server.ServerConfig, ROOT / "configs/server.yaml")
    assert cfg == server.ServerConfig()  # the file documents the defaults, it does not change them


# -- traces: an application logs through the server, `flywheel mine` reads them back -------------------------

APP = """
import json
from flywheel.pipelines import applog

ids = []
for i in range(12):
    tid = applog.log_interaction(
        messages=[{"role": "user", "content": f"Question {i}: is {['kale', 'rice', 'tofu'][i % 3]} good at breakfast?"}],
        answer=f"Answer {i}: yes, a portion of it makes a balanced breakfast with fruit and some protein.",
        user_id=f"user-{i}", prompt_variant="v2" if i % 2 else "v1", context=["Breakfast guide."] if i % 2 else None,
        latency_ms=300, tokens=40, model="m-1", rating=5 if i % 4 == 0 else None)  # rated at once: async export
    ids.append(tid)
for i, tid in enumerate(ids):  # ratings arriving later
    if i % 4 == 1:
        applog.log_rating(tid, False)
    elif i % 4 == 2:
        applog.log_rating(tid, 4)
print(json.dumps(ids))
"""


@pytest.mark.slow
def test_traces_logged_by_an_application_through_the_server_are_mined(team, tmp_path):
    env = client_env(team["url"], tmp_path / "home")
    # MLflow's default async trace export, as in an application: the helper's experiment is `assistant`
    app = subprocess.run([sys.executable, "-c", APP], cwd=ROOT, env={**env, "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "true"},
                         capture_output=True, text=True, timeout=300)
    assert app.returncode == 0, app.stderr[-2000:]
    ids = json.loads(app.stdout.strip().splitlines()[-1])
    out = flywheel(env, "mine", "mlflow-traces:assistant", "--out", str(tmp_path / "ds"), "workers=1",
                   "dedupe.near=false")  # the answers differ only in their numbers
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    (inp,) = m["inputs"]
    # every trace accounted for: 3 rated 5 and 3 rated 4 kept, 3 thumbs down, 3 never rated
    assert inp["read"] == 12 == inp["kept"] + inp["rejected"] + sum(inp["filtered"].values())
    assert inp["kept"] == 6 and inp["filtered"] == {"low_rating": 3, "no_rating": 3}
    rows = [json.loads(x) for name in ("train.jsonl", "eval.jsonl")
            for x in (tmp_path / "ds" / name).read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(t for i, t in enumerate(ids) if i % 4 in (0, 2))
    runs = _client(team["url"]).search_runs([_client(team["url"]).get_experiment_by_name("flywheel/mine")
                                             .experiment_id], f"tags.`flywheel.dataset_version` = '{m['version']}'")
    assert len(runs) == 1  # the mine run is on the server too
