import pytest
from pydantic import Field

from flywheel.pipelines.config import ConfigError, StageConfig, apply_overrides, load_config


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
