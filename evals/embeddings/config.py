"""`flywheel bench-embeddings` settings: the models, the tasks, and how quality and speed are measured.

Run with: flywheel bench-embeddings --config configs/embeddings.yaml [models=[static-64,all-MiniLM-L6-v2]]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from flywheel.foundation.config import StageConfig
from flywheel.foundation.io import home_path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


class SpeedConfig(StageConfig):
    """The speed probe: run once per model x task, then cached with the vectors."""

    n_texts: int = Field(256, ge=1, description="texts of the task encoded (in batches) for throughput")
    n_latency: int = Field(50, ge=1, description="single-text encodes for latency p50/p95")
    refresh: bool = Field(False, description="re-measure even when a cached measurement exists")


class StatsConfig(StageConfig):
    """Paired comparisons between the models of one task."""

    test: Literal["wilcoxon", "permutation"] = Field(
        "wilcoxon", description="retrieval: paired test on per-query nDCG@10 (STS always bootstraps Spearman)")
    n_boot: int = Field(2000, ge=100, description="bootstrap resamples for confidence intervals")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level after Holm correction within a task")
    min_queries: int = Field(30, ge=1, description="below this, a non-significant result is 'too few to tell'")


class CalibrationConfig(StageConfig):
    """Duplicate-threshold calibration on STS (or labelled) pairs."""

    duplicate_min_score: float = Field(4.0, ge=0, le=5, description="STS gold score >= this is a duplicate")
    target_precision: float = Field(0.9, gt=0, le=1,
                                    description="report the lowest cosine threshold reaching this precision")
    fixed_threshold: float = Field(0.95, description="a fixed cosine rule, reported for comparison")


class EmbeddingsConfig(StageConfig):
    """Embedding models x tasks: retrieval, STS, duplicate threshold, speed."""

    # mpnet is optional (`make models-mpnet`): configs/embeddings.yaml adds it.
    models: list[str] = Field(["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2", "static-64"],
                              description="catalog names (flywheel.evals.embeddings.models) or local model dirs")
    tasks: list[str] = Field(["medline", "cranfield", "stsb"],
                             description="BEIR names under data_dir, 'stsb', a mined dataset dir, or a pairs JSONL")
    out: str = Field(default_factory=lambda: home_path("embeddings"),
                     description="output directory (written whole or not at all); default <FLYWHEEL_HOME>/embeddings")
    force: bool = Field(False, description="replace an existing `out` Flywheel did not write")
    data_dir: str | None = Field(None, description="where named tasks live; default: ../shared/data next to the repo")
    qrels_split: str = Field("test", description="BEIR qrels split (qrels/<split>.tsv)")
    sts_split: str = Field("dev", description="STS-B split (sts-<split>.csv)")
    max_docs: int | None = Field(None, ge=1, description="subsample the corpus, keeping every relevant document "
                                 "of the kept queries (easier, never wrong); None: all")
    max_queries: int | None = Field(None, ge=1, description="subsample queries (seeded); None: all")
    max_pairs: int | None = Field(None, ge=2, description="subsample STS pairs (seeded); None: all")
    title_dedupe: bool = Field(False, description="BEIR: drop a title the text already starts with (Cranfield); "
                               "false embeds title + ' ' + text like BEIR, MTEB and sentence-transformers")
    batch_size: int = Field(32, ge=1, description="encode batch size (also part of the speed-record key)")
    cache: bool = Field(True, description="reuse cached vectors and speed records (model identity + text hash)")
    cache_dir: str | None = Field(None, description="embedding vectors + speed records; "
                                  "default $FLYWHEEL_CACHE/embeddings")
    seed: int = Field(0, description="seed for subsampling, speed samples and bootstraps")
    speed: SpeedConfig = Field(default_factory=SpeedConfig, description="the speed probe")
    stats: StatsConfig = Field(default_factory=StatsConfig, description="paired model comparisons")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig,
                                           description="duplicate-threshold calibration")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: Flywheel's sqlite store")
    run_name: str | None = Field(None, description="MLflow parent run name")

    @field_validator("models", "tasks")
    @classmethod
    def _non_empty_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must name at least one")
        dups = sorted({x for x in v if v.count(x) > 1})
        if dups:
            raise ValueError(f"duplicates: {dups}")
        return v


def demo_config(dataset_dir: str | Path, out: str | Path, **overrides: Any) -> EmbeddingsConfig:
    """The fast version `flywheel demo` runs: the two fastest models on the demo's mined dataset + 200 STS pairs."""
    base = {"models": ["static-64", "paraphrase-MiniLM-L3-v2"], "tasks": [str(dataset_dir), "stsb"],
            "max_pairs": 200, "out": str(out), "speed": {"n_texts": 64, "n_latency": 20},
            "stats": {"n_boot": 500}}
    base.update(overrides)
    return EmbeddingsConfig.model_validate(base)
