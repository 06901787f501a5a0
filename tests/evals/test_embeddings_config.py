"""The benchmark's settings (flywheel.evals.embeddings.config): defaults, the shipped config, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.evals.embeddings.config import EmbeddingsConfig, demo_config
from flywheel.pipelines.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_config_errors(tmp_path):
    cfg = demo_config(tmp_path / "ds", tmp_path / "out")
    assert cfg.models == ["static-64", "paraphrase-MiniLM-L3-v2"] and cfg.tasks[0] == str(tmp_path / "ds")
    assert load_config(EmbeddingsConfig, ROOT / "configs" / "embeddings.yaml").models[2] == "all-mpnet-base-v2"
    with pytest.raises(ConfigError, match="modles: unknown key"):
        load_config(EmbeddingsConfig, None, ["modles=[x]"])
    with pytest.raises(ConfigError, match="duplicates"):
        load_config(EmbeddingsConfig, None, ["models=[static-64,static-64]"])
    with pytest.raises(ConfigError, match="stats.test"):
        load_config(EmbeddingsConfig, None, ["stats.test=ttest"])
