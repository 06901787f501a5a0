"""The PR gate workflow (.github/workflows/flywheel-gate.yml) runs nowhere but on GitHub, so its `run:` scripts are
executed here verbatim (bash -e, as the runner does), with `${{ }}` expressions resolved from a fixed table and
`.venv/bin/{python,flywheel}` pointing at this checkout: a renamed flag, config key or output path breaks the
suite before it breaks a pull request. Only the install step and the `gh` comment are left out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flywheel.mining.demo_logs import write_demo_logs

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "flywheel-gate.yml"
SKIPPED_STEPS = ("make install", "gh pr comment")  # the venv is ours; no GitHub to post to


def _job() -> dict:
    wf = yaml.safe_load(WORKFLOW.read_text())
    return wf["jobs"]["gate"]


def _workspace(tmp_path: Path) -> Path:
    """A checkout-like directory: the repo's configs, and a `.venv/bin` whose python/flywheel run this code."""
    ws = tmp_path / "ws"
    (ws / ".venv" / "bin").mkdir(parents=True)
    (ws / "configs").symlink_to(ROOT / "configs")
    for name, cmd in (("python", f'exec "{sys.executable}" "$@"'),
                      ("flywheel", f'exec "{sys.executable}" -m flywheel.pipelines "$@"')):
        p = ws / ".venv" / "bin" / name
        p.write_text(f"#!/bin/sh\n{cmd}\n")
        p.chmod(0o755)
    return ws


class Runner:
    def __init__(self, ws: Path, logs: str):
        self.ws, self.outputs, self.github_output = ws, {}, ws / "github_output"
        job_env = _job()["env"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "FLYWHEEL_HOME"}
        self.env.update({k: self.expr(str(v), logs=logs) for k, v in job_env.items()})
        self.env.update(PYTHONPATH=str(ROOT), HOME=str(ws / "home"), GITHUB_OUTPUT=str(self.github_output),
                        FLYWHEEL_CACHE=os.environ.get("FLYWHEEL_CACHE", str(Path.home() / ".cache" / "flywheel")))

    def expr(self, text: str, logs: str = "") -> str:
        table = {"secrets.MLFLOW_TRACKING_URI": "",  # the secret unset: a fresh embedded store
                 "vars.FLYWHEEL_CI_LOGS || 'logs'": logs,
                 "github.event.pull_request.number": "1", "github.token": "t"}
        table.update({f"steps.loop.outputs.{k}": v for k, v in self.outputs.items()})

        def sub(m: re.Match) -> str:
            key = m.group(1).strip()
            assert key in table, f"workflow uses ${{{{ {key} }}}}: teach this test what it resolves to"
            return table[key]
        return re.sub(r"\$\{\{(.*?)\}\}", sub, text)

    def step(self, name_prefix: str) -> subprocess.CompletedProcess:
        step = next(s for s in _job()["steps"] if s.get("name", "").startswith(name_prefix))
        self.github_output.write_text("")
        r = subprocess.run(["bash", "-e", "-c", self.expr(step["run"])], cwd=self.ws, env=self.env,
                           capture_output=True, text=True, timeout=600)
        for line in self.github_output.read_text().splitlines():
            k, _, v = line.partition("=")
            self.outputs[k] = v
        return r


def test_every_run_step_is_covered_here():
    names = [s.get("name", s.get("uses")) for s in _job()["steps"] if "run" in s
             and not any(s["run"].lstrip().startswith(x) for x in SKIPPED_STEPS)]
    assert names == ["Logs to run on", "Flywheel loop (mine -> train -> eval -> gate), no promotion from a PR",
                     "Fail the check unless the gate passed"]


@pytest.mark.slow
def test_workflow_steps_on_tiny_logs(tmp_path):
    ws = _workspace(tmp_path)
    # No logs in the repository: the step writes the embedded demo logs where LOGS points.
    gen = Runner(ws, "generated")
    r = gen.step("Logs to run on")
    assert r.returncode == 0, r.stderr
    assert len((ws / "generated" / "demo.jsonl").read_bytes().splitlines()) >= 300

    # A few new logs: the loop mines them, finds too few kept records to train, says SKIPPED; the check passes.
    (ws / "tiny").mkdir()
    write_demo_logs(ws / "tiny" / "demo.jsonl", n=20)
    run = Runner(ws, "tiny")
    r = run.step("Logs to run on")
    assert r.returncode == 0, r.stderr
    r = run.step("Flywheel loop")
    assert r.returncode == 0, r.stderr
    assert run.outputs["code"] == "0", r.stdout + r.stderr
    assert "SKIPPED" in (ws / run.outputs["report"]).read_text()
    assert (ws / ".flywheel" / "ci" / "state.json").exists()  # what the upload step collects
    assert run.step("Fail the check").returncode == 0

    # Logs the loop cannot read (not a chat-log format): exit 2, an ERROR report is still posted, the check fails.
    (ws / "broken").mkdir()
    (ws / "broken" / "a.jsonl").write_text('{"not": "a chat log"}\n')
    bad = Runner(ws, "broken")
    r = bad.step("Flywheel loop")
    assert r.returncode == 0, r.stderr  # `set +e`: the step records the code instead of dying
    assert bad.outputs["code"] == "2"
    assert "ERROR** (exit 2)" in (ws / bad.outputs["report"]).read_text()
    fail = bad.step("Fail the check")
    assert fail.returncode != 0 and "gate exit code: 2" in fail.stdout
