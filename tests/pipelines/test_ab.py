"""`flywheel ab` shell: CLI flags, --json == report.json in MLflow, tags as documented, plan, light imports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.evals.ab.config import AbConfig
from flywheel.pipelines.ab import run_ab
from flywheel.pipelines.cli import app
from flywheel.pipelines.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def demo_logs(tmp_path_factory):
    from flywheel.mining.demo_logs import write_demo_logs

    p = tmp_path_factory.mktemp("ablogs") / "logs.jsonl"
    write_demo_logs(p, n=300, seed=1)
    return p


@pytest.mark.slow
def test_analyze_json_matches_mlflow_artifact_and_python_entry(mlflow_store, demo_logs, tmp_path):
    """One store for both (creating an MLflow sqlite schema costs seconds on a busy 2-core box)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    res = runner.invoke(app, ["ab", "analyze", str(demo_logs), "--config", str(ROOT / "configs/ab.yaml"),
                              "--json", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert {"comparisons", "srm", "verdicts"} <= set(report)
    assert (tmp_path / "out" / "report.json").read_text() == res.stdout
    client = MlflowClient()
    exp = client.get_experiment_by_name("flywheel/ab")
    (run,) = client.search_runs([exp.experiment_id])
    tags = run.data.tags
    assert tags["flywheel.stage"] == "ab"
    assert tags["flywheel.ab.srm_status"] == report["srm"]["status"]
    assert tags["flywheel.ab.verdict.v2"] == report["verdicts"]["v2"]["decision"]
    assert str(demo_logs.resolve()) in tags["flywheel.input.logs"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "ab_rating.png", "ab_success.png", "ab_latency_ms.png", "ab_tokens.png"} <= arts
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="report.json",
                                                dst_path=str(tmp_path / "dl"))
    assert Path(local).read_text() == res.stdout
    m = run.data.metrics
    c = next(c for c in report["comparisons"] if c["metric"] == "rating")
    assert m["v2.rating.p_adjusted"] == pytest.approx(c["p_adjusted"])
    assert m["rows.read"] == report["rows"]["read"]

    # the python entry the demo / loop call, with the embedded defaults (no config file)
    out = run_ab([demo_logs], AbConfig())
    assert out["run_id"] and out["report"]["control"] == "v1"
    assert [m["name"] for m in out["report"]["metrics"]] == ["rating", "success", "latency_ms", "tokens"]
    assert out["report"]["verdicts"]["v2"]["decision"] in ("ship", "don't ship", "keep running", "invalid")


def test_flags_override_config(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("item,arm,score\n" + "".join(f"i{i},{a},{(i * 7 + (a == 'B') * 3) % 10}\n"
                                                  for i in range(30) for a in "AB"))
    res = runner.invoke(app, ["ab", "analyze", str(csv), "--unit", "item", "--variant", "arm", "--metric", "score",
                              "--control", "A", "--paired", "--alpha", "0.1", "--json", "log_mlflow=false"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["design"] == "paired" and rep["alpha"] == 0.1 and rep["control"] == "A"
    assert [c["metric"] for c in rep["comparisons"]] == ["score"]
    # human output names the verdict
    res = runner.invoke(app, ["ab", "analyze", str(csv), "--unit", "none", "--variant", "arm", "--metric", "score",
                              "log_mlflow=false"])
    assert res.exit_code == 0, res.output
    assert "B:" in res.stdout and "SRM" in res.stdout


def test_bad_config_and_input_are_one_line_errors(tmp_path):
    res = runner.invoke(app, ["ab", "analyze", "x.jsonl", "nonsense_key=1"])
    assert isinstance(res.exception, ConfigError) and "nonsense_key: unknown key" in str(res.exception)
    (tmp_path / "a.jsonl").write_text('{"user_id": 1, "prompt_variant": "v1", "rating": 4}\n')
    out = subprocess.run([sys.executable, "-m", "flywheel.pipelines", "ab", "analyze", str(tmp_path / "a.jsonl"),
                          "--metric", "rating", "log_mlflow=false"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "only one variant" in out.stderr and "Traceback" not in out.stderr


def test_plan_sample_size_and_mde():
    res = runner.invoke(app, ["ab", "plan", "--type", "mean", "--baseline", "3.6", "--sd", "1.1", "--mde", "0.05",
                              "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    from statsmodels.stats.power import TTestIndPower
    import math

    assert r["n_per_arm"] == math.ceil(TTestIndPower().solve_power(0.18 / 1.1, alpha=0.05, power=0.8))
    res = runner.invoke(app, ["ab", "plan", "--type", "proportion", "--baseline", "0.4", "--daily-units", "1000",
                              "--days", "14"])
    assert res.exit_code == 0 and "minimum detectable effect" in res.stdout and "assumptions" in res.stdout


def test_module_imports_stay_light():
    code = "import sys, flywheel.pipelines.ab; bad = [m for m in ('numpy', 'scipy', 'pandas', 'mlflow') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_guardrail_missing_in_one_arm_is_not_a_ship(tmp_path):
    """v2 never logged latency: the CLI says the guardrail cannot be evaluated and does not ship."""
    import random

    rng = random.Random(0)
    rows = []
    for u in range(2000):
        v = "v1" if u % 2 else "v2"
        r = {"user_id": u, "prompt_variant": v, "rating": min(5, max(1, round(rng.gauss(3.3 + (v == "v2"), 1))))}
        if v == "v1":
            r["latency_ms"], r["tokens"] = rng.gauss(900, 50), rng.gauss(200, 20)
        else:
            r["tokens"] = rng.gauss(200, 20)
        rows.append(json.dumps(r))
    (tmp_path / "l.jsonl").write_text("\n".join(rows) + "\n")
    res = runner.invoke(app, ["ab", "analyze", str(tmp_path / "l.jsonl"), "--config", str(ROOT / "configs/ab.yaml"),
                              "log_mlflow=false"])
    assert res.exit_code == 0, res.output
    assert "INVALID" in res.stdout and "guardrail latency_ms cannot be evaluated" in res.stdout
    assert "SHIP" not in res.stdout.replace("DON'T SHIP", "")


def test_unreadable_inputs_are_one_line_errors(tmp_path):
    import random

    from flywheel.foundation.errors import InputError

    junk = random.Random(0).randbytes(3000)
    cases = {"r.csv": (junk, "not a UTF-8 CSV file"), "r.parquet": (junk, "not a readable Parquet file"),
             "r.jsonl": (junk, "non-empty lines is a JSON object; is it JSONL?"),
             "ragged.csv": (b"user_id,prompt_variant,rating\n1,v1,4\n2,v2,5,7,8\n", "Expected 3 fields in line 3"),
             "nounit.csv": (b"user_id,prompt_variant,rating\n" + b"".join(b",v%d,4\n" % (i % 2 + 1) for i in range(20)),
                            "unit column 'user_id' is empty in every row")}
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        res = runner.invoke(app, ["ab", "analyze", str(tmp_path / name), "--metric", "rating", "log_mlflow=false"])
        assert isinstance(res.exception, InputError) and msg in str(res.exception), (name, res.exception)
        assert "\n" not in str(res.exception)
    out = subprocess.run([sys.executable, "-m", "flywheel.pipelines", "ab", "analyze", str(tmp_path / "ragged.csv"),
                          "log_mlflow=false"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_guardrail_margin_default_is_one_number():
    """The engine reads the config model itself, so a Python caller and the CLI share the default margin."""
    from flywheel.evals.ab.config import DEFAULT_METRICS, MetricConfig

    assert MetricConfig(name="x").margin == 0.10
    assert [m.margin for m in DEFAULT_METRICS if m.guardrail] == [0.10, 0.10]
