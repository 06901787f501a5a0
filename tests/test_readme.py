"""Every shell example in README.md (```bash blocks) runs, or is in SKIP with the reason it cannot run here.

The examples run as written, in a scratch folder that looks like a user's checkout after `make demo`: `configs/`
and `bench/` of this repository, `../shared/data` when present, demo logs as `logs.jsonl` / `logs/` / `more.csv`,
and the demo's mined dataset at `.flywheel/demo/dataset` (made by one `flywheel mine` instead of the two-minute
demo). Optional parts (`[--json]`) are dropped, so the plain form runs. An example that matches neither RUN nor
SKIP fails the test: a new README example must be classified, so the documentation cannot drift.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BIN = Path(sys.executable).parent

# (pattern on the example, reason): examples that need what a test cannot have.
SKIP = [
    (r"^make (demo|test)\b", "installs a venv and runs the demo / whole suite: that is CI itself (.ci/run)"),
    (r"^make (gpu|llama-cpp|llama-cpp-converters)\b", "needs CUDA, PyPI or a 15-minute build"),
    (r"^bash bench/gpu/check\.sh", "needs a CUDA GPU"),
    (r"^flywheel train ", "trains a model (minutes; tests/pipelines/test_train.py runs training)"),
    (r"^(torchrun|accelerate launch) ", "multi-GPU / multi-node (tests/pipelines/test_train_ddp.py runs DDP on CPU)"),
    (r"^flywheel bench-embeddings --config configs/embeddings\.yaml",
     "4 models on the full benchmarks, needs `make models-mpnet` (results in bench/results/)"),
    (r"^(OMP_NUM_THREADS=1 )?python bench/", "benchmarks: minutes, results in bench/results/"),
    (r"^flywheel eval .*candidate=(runs:/<|models:/)", "needs a trained adapter / a champion"),
    (r"^flywheel gate ", "needs a trained adapter (tests/pipelines/test_gate.py, test_loop.py)"),
    (r"^flywheel publish ", "needs a champion (tests/pipelines/test_publish.py)"),
    (r"^flywheel dashboard", "a long-running server (tests/dashboard/ renders every page)"),
    (r"^flywheel mine .*engine=ray ray\.address=", "needs a running Ray cluster (tests/mining/test_ray_engine.py "
                                                 "runs the engine on a local Ray)"),
    (r"^flywheel mine mlflow-traces:", "needs an experiment of rated traces (tests/pipelines/test_traces.py builds "
                                       "one)"),
    (r"^flywheel server ", "starts PostgreSQL + an MLflow server (tests/pipelines/test_server.py runs them)"),
]

# Examples whose placeholders need a value here: (pattern, {text: replacement}).
SUBST = [
    (r"^cp -r \.flywheel /data/flywheel-home", {"/data/flywheel-home": "{tmp}/moved-home"}),
]

NEEDS_SHARED = "../shared/data"


def examples() -> list[str]:
    """Each command of the README's ```bash blocks: continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = _strip_comment(cmd).strip()
            if cmd:
                out.append(re.sub(r"\s+", " ", cmd))
    return out


def _strip_comment(line: str) -> str:
    """Drop a trailing `# ...` that is not inside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _drop_optional(cmd: str) -> str:
    """`[--json]`, `[inputs=[logs/]]`, `[flywheel-demo]`: optional parts go, the plain form runs."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(cmd):
        if ch == "[" and depth == 0 and (i == 0 or cmd[i - 1] == " "):
            out.append(cmd[start:i])
            depth = 1
        elif ch == "[" and depth:
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
            if depth == 0:
                start = i + 1
    if depth == 0:
        out.append(cmd[start:])
    return re.sub(r"\s+", " ", "".join(out)).strip()


def _skip_reason(cmd: str) -> str | None:
    return next((reason for pat, reason in SKIP if re.search(pat, cmd)), None)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    """A user's working folder after the install and a demo, built cheaply."""
    from flywheel.mining.demo_logs import write_demo_logs

    base = tmp_path_factory.mktemp("readme")
    work = base / "work"
    work.mkdir()
    for name in ("configs", "bench"):
        (work / name).symlink_to(ROOT / name)
    if SHARED.exists():
        (base / "shared").symlink_to(SHARED)
    write_demo_logs(work / "logs.jsonl", n=300, seed=0)
    write_demo_logs(work / "logs" / "day1.jsonl", n=60, seed=3)  # too few to train: `flywheel run` stops there
    rows = []
    for line in (work / "logs.jsonl").read_bytes().splitlines()[:40]:  # the demo logs plant malformed lines
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("messages"), list) and "rating" in r]
    with open(work / "more.csv", "w", newline="") as f:  # the flat RAG-log shape, as CSV
        w = csv.writer(f)
        w.writerow(["user_query", "retrieved_documents", "llm_response", "user_rating"])
        for r in rows:
            w.writerow([r["messages"][0]["content"], r.get("retrieved_context") or "",
                        r["messages"][-1]["content"], r["rating"]])
    env = _env(work)
    subprocess.run([str(BIN / "flywheel"), "mine", "logs.jsonl", "--out", ".flywheel/demo/dataset", "workers=1"],
                   cwd=work, env=env, check=True, capture_output=True, timeout=600)
    return work


def _env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLYWHEEL_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_every_example_is_classified():
    """Runnable (no unresolved `<placeholder>` or `...`) or skipped with a reason."""
    for cmd in examples():
        if _skip_reason(cmd):
            continue
        plain = _drop_optional(cmd)
        assert "<" not in plain and " ... " not in f" {plain} ", (
            f"README example with a placeholder and no SKIP entry in tests/test_readme.py: {cmd}")


@pytest.mark.slow
@pytest.mark.parametrize("cmd", examples())
def test_readme_example_runs(cmd, user_dir):
    reason = _skip_reason(cmd)
    if reason:
        pytest.skip(reason)
    if NEEDS_SHARED in cmd and not SHARED.exists():
        pytest.skip(f"real data not available: {SHARED / 'data'}")
    run = _drop_optional(cmd)
    for pat, subs in SUBST:
        if re.search(pat, run):
            for k, v in subs.items():
                run = run.replace(k, v.format(tmp=user_dir.parent))
    proc = subprocess.run(["bash", "-c", run], cwd=user_dir, env=_env(user_dir), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{run}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
