import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import Field, ValidationError

from flywheel.pipelines.config import (ConfigError, StageConfig, apply_overrides, format_validation_error, load_config,
                              split_args)

ROOT = Path(__file__).resolve().parents[2]


class Lora(StageConfig):
    r: int = Field(8, gt=0)
    alpha: int = 16


class Cfg(StageConfig):
    min_rating: int = Field(4, ge=1, le=5)
    models: list[str] = ["a"]
    lora: Lora = Lora()


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("# flywheel x --config c.yaml\nmin_rating: 3\nlora:\n  alpha: 32\n")
    cfg = load_config(Cfg, f, ["models=[x, y]", "lora.r=16", "min_rating=5"])
    assert cfg.min_rating == 5 and cfg.models == ["x", "y"] and cfg.lora.r == 16 and cfg.lora.alpha == 32


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="lora.rank: unknown key"):
        load_config(Cfg, None, ["lora.rank=4"])


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"lora.r: .*greater than 0"):
        load_config(Cfg, None, ["lora.r=0"])
    with pytest.raises(ConfigError, match="min_rating"):
        load_config(Cfg, None, ["min_rating=five"])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(Cfg, bad)


# ------------------------------------------------------------------------------------------ strictness


class Num(StageConfig):
    n: int = 1
    lr: float = 0.1
    opt: float | None = None
    flag: bool = False
    items: list[int] = []


def _write(tmp_path, text, name="c.yaml"):
    f = tmp_path / name
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return f


def test_duplicate_keys_are_errors_with_file_line_and_key(tmp_path):
    f = _write(tmp_path, "min_rating: 3\nmodels: [a]\nmin_rating: 5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: duplicate key 'min_rating' \(first given on line 1\)"):
        load_config(Cfg, f)
    f = _write(tmp_path, "lora: {r: 1, alpha: 2, r: 4}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:1: duplicate key 'r'"):
        load_config(Cfg, f)


def test_anchor_bomb_is_refused_fast(tmp_path):
    """Nine levels of nine aliases: 9**9 strings if expanded. Refused at the first anchor, naming the line."""
    text, prev = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n', "a"
    for k in "bcdefghi":
        text += f"{k}: &{k} [" + ",".join([f"*{prev}"] * 9) + "]\n"
        prev = k
    assert len(text) < 600
    f = _write(tmp_path, "models: [a]\n" + text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"c\.yaml:2: YAML anchor &a: anchors and aliases are not allowed"):
        load_config(Cfg, f)
    assert time.perf_counter() - t0 < 1
    with pytest.raises(ConfigError, match="alias|anchor"):
        load_config(Num, None, ["items=[&x 1, *x]"])


def test_validation_error_formatter_is_bounded():
    huge = 10 ** 20000  # repr() of this raises ValueError (over 4300 digits)
    with pytest.raises(ValidationError) as e:
        Num.model_validate({"flag": [huge] * 10 ** 6, "n": "x", "lr": "y", "opt": "z", "zz": 1,
                            **{f"k{i}": i for i in range(30)}})
    t0 = time.perf_counter()
    msg = format_validation_error(e.value, "c.yaml")
    assert time.perf_counter() - t0 < 0.5
    assert len(msg) < 3000 and "more problems" in msg and len(msg.splitlines()) == 11
    with pytest.raises(ValidationError) as e:
        Num.model_validate({"n": huge})
    assert "integer of about 20000 digits" in format_validation_error(e.value, "c.yaml")


def test_booleans_are_not_numbers_and_floats_are_finite(tmp_path):
    for bad in ("n: true", "lr: true", "opt: false", "lr: .inf", "lr: .nan", "opt: -.inf"):
        key = bad.split(":")[0]
        with pytest.raises(ConfigError, match=rf"c\.yaml: {key}: (expected a number, got a boolean|.*finite)"):
            load_config(Num, _write(tmp_path, bad + "\n"))
    with pytest.raises(ConfigError, match="overrides: lr: .*finite"):
        load_config(Num, None, ["lr=nan"])
    with pytest.raises(ConfigError, match="overrides: n: expected a number, got a boolean"):
        load_config(Num, None, ["n=yes"])
    assert load_config(Num, _write(tmp_path, "flag: true\nn: 3\nlr: 1\n")).model_dump() == {
        "n": 3, "lr": 1.0, "opt": None, "flag": True, "items": []}


def test_huge_integers_and_binary_files_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: a value cannot be read \(Exceeds the limit"):
        load_config(Num, _write(tmp_path, "n: " + "9" * 5000 + "\n"))
    with pytest.raises(ConfigError, match=r"c\.yaml: n: integer out of range \(about 100 digits"):
        load_config(Num, _write(tmp_path, "n: " + "9" * 100 + "\n"))
    with pytest.raises(ConfigError, match="override n: .* cannot be read"):
        load_config(Num, None, ["n=" + "9" * 5000])
    binary = _write(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "b.yaml")
    with pytest.raises(ConfigError, match=r"b\.yaml: not a UTF-8 text file \(byte 0x89 at offset 0\)"):
        load_config(Num, binary)
    out = subprocess.run([sys.executable, "-m", "flywheel.pipelines", "ab", "analyze", "x.jsonl", "--config", str(binary)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "not a UTF-8 text file" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_bounds_on_training_steps_and_mine_workers():
    from flywheel.pipelines.mine import MineConfig, usable_cpus
    from flywheel.pipelines.train import TrainConfig

    with pytest.raises(ConfigError, match="max_steps: .*greater than or equal to -1"):
        load_config(TrainConfig, None, ["max_steps=-100"])
    assert load_config(TrainConfig, None, ["max_steps=-1"]).max_steps == -1
    cpus = usable_cpus()
    with pytest.raises(ConfigError, match=rf"workers={cpus + 31} is more than the {cpus} CPUs"):
        load_config(MineConfig, None, [f"workers={cpus + 31}"])
    assert load_config(MineConfig, None, [f"workers={cpus}"]).workers == cpus


def test_an_existing_path_with_equals_sign_is_an_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs_v=2.jsonl").write_text("{}\n")
    assert split_args(["logs_v=2.jsonl", "min_rating=5", "other.jsonl"]) == (
        ["logs_v=2.jsonl", "other.jsonl"], ["min_rating=5"])


def test_mine_cli_reads_a_path_with_equals_sign(tmp_path):
    from typer.testing import CliRunner

    from flywheel.pipelines.cli import app
    from flywheel.mining.demo_logs import write_demo_logs

    logs = tmp_path / "logs_v=2.jsonl"
    write_demo_logs(logs, n=60, seed=0)
    res = CliRunner().invoke(app, ["mine", str(logs), "--out", str(tmp_path / "ds"), "log_mlflow=false",
                                   "progress=false", "workers=1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ds" / "train.jsonl").exists()
