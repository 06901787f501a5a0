"""`MineConfig`: every setting of `flywheel mine` with its one default (configs/mine.yaml spells them out).

The shell loads it from YAML + `key=value` overrides (`flywheel.pipelines.config.load_config`); the mining engine
reads it. Keys in `RUNTIME_KEYS` change how fast a run goes or where it is logged, never what it writes, so they
are kept out of the dataset version.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator

from flywheel.foundation.config import StageConfig

RUNTIME_KEYS = ("workers", "batch_size", "tracking_uri", "log_mlflow", "progress", "engine", "ray")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class DedupeConfig(StageConfig):
    near: bool = Field(True, description="MinHash LSH near-dedupe on the assistant reply; exact dedupe on the "
                                         "normalised conversation always runs")
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity that makes two replies "
                                                          "near duplicates; 0.8 with 3-word shingles catches "
                                                          "one-word edits")
    num_perm: int = Field(128, ge=16, le=512, description="MinHash permutations (signature length)")
    shingle: int = Field(3, ge=1, le=10, description="words per shingle; 5 misses one-word edits of short chat "
                                                     "messages")


class PreferenceConfig(StageConfig):
    from_rating_gap: bool = Field(True, description="pair the best- and the worst-rated answer to the same prompt "
                                                    "when their ratings differ by at least min_rating_gap")
    min_rating_gap: int = Field(2, ge=1, le=4, description="smallest rating difference that makes a pair")
    max_rank_pairs: int = Field(3, ge=1, description="oasst: the best-ranked sibling against up to this many "
                                                     "worse ones")


class RayConfig(StageConfig):
    address: str | None = Field(None, description="Ray cluster to run on: `auto` (inside a cluster), "
                                                  "`ray://head:10001`, or unset to start a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray started when `address` is unset; "
                                                         "unset = the machine's")
    blocks: int = Field(0, ge=0, description="input blocks (Ray tasks) for parse + curate; 0 = 4 per CPU of "
                                             "the cluster, more where a block would exceed 32 MiB of input")


class TracesConfig(StageConfig):
    """How `mlflow-traces:<experiment>` inputs are read and mapped (`flywheel.mining.traces`)."""
    filter_string: str | None = Field(None, description="MLflow trace search filter, e.g. \"tags.env = 'prod'\"; "
                                                        "null = every trace of the experiment")
    max_age_days: float | None = Field(None, gt=0, description="only traces requested in the last N days; null = "
                                                               "no window")
    rating_name: str = Field("user_rating", description="name of the feedback assessment that rates a trace")
    rating_rule: Literal["human_first", "latest", "human_only"] = Field(
        "human_first", description="which feedback counts: the latest HUMAN one, else the latest of any source "
                                   "(LLM judge, code); latest: the latest of any; human_only: HUMAN ones only")
    true_rating: int = Field(5, ge=1, le=5, description="rating of a boolean feedback `true` (thumbs up)")
    false_rating: int = Field(1, ge=1, le=5, description="rating of a boolean feedback `false` (thumbs down)")
    messages_field: str = Field("messages", description="dotted path in the root span's inputs to the OpenAI-style "
                                                        "messages list (what autologging records)")
    question_field: str | None = Field(None, description="dotted path in the root span's inputs to the user's "
                                                         "question, for a custom @mlflow.trace function; "
                                                         "used when a trace has no messages_field list")
    answer_field: str | None = Field(None, description="dotted path in the root span's outputs to the answer; "
                                                       "null: a string output, choices.0.message.content, "
                                                       "content or message.content")
    variant_tag: str = Field("prompt_variant", description="trace tag (or metadata key) naming the prompt variant")
    model_tag: str = Field("model", description="trace tag (or metadata key) naming the model")
    lang_tag: str = Field("lang", description="trace tag (or metadata key) declaring the language")


class MineConfig(StageConfig):
    format: Literal["auto", "chatlog", "oasst1", "oasst2", "hh"] = Field(
        "auto", description="input format; auto: by suffix and the first record's keys")
    min_rating: int = Field(4, ge=1, le=5, description="lowest rating kept for SFT (4-5 stars is \"good enough to "
                                                       "imitate\"); lower ones still feed rating-gap pairs")
    min_chars: int = Field(2, ge=0, description="shortest assistant reply kept (characters)")
    max_chars: int = Field(20_000, gt=0, description="longest conversation kept (all turns + retrieved context)")
    languages: list[str] = Field(default_factory=list, description="e.g. [en]; empty = no language filter. A "
                                                                   "declared `lang` decides, else detection")
    detect_language: bool = Field(True, description="with `languages`: detect the reply's language when no `lang` "
                                                    "is declared")
    detect_min_chars: int = Field(20, ge=1, description="shorter replies are not judged by the detector (they "
                                                        "pass)")
    oasst_rating: Literal["quality", "helpfulness", "rank", "quality_then_rank"] = Field(
        "quality", description="which oasst signal becomes the 1-5 rating")
    redact_pii: bool = Field(True, description="replace emails, phones, cards, IBANs, IPs by placeholders")
    phone_region: str = Field("US", description="region for phone numbers written without a +country code")
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig, description="exact and near dedupe")
    preferences: PreferenceConfig = Field(default_factory=PreferenceConfig, description="preference pairs")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="share of groups (conversations, prompts) hashed "
                                                              "into the eval splits")
    split_salt: str = Field("flywheel", description="salt of the split hash; change it to draw another split")
    traces: TracesConfig = Field(default_factory=TracesConfig, description="mlflow-traces:<experiment> inputs")
    system_template: str = Field("Answer using this context:\n{context}",
                                 description="system message built from a record's retrieved context")
    max_line_bytes: int = Field(1_000_000, gt=0, description="longer lines are rejected unread (a 10 MB line is not "
                                                             "a chat)")
    workers: int = Field(0, ge=0, description="processes for parse + curate; 0 = min(2, CPUs); 1 = in-process")
    batch_size: int = Field(512, ge=1, description="records per task sent to a worker")
    engine: Literal["local", "ray"] = Field("local", description="local: one process and its pool; ray: Ray "
                                                               "Data stages on a Ray cluster (same output bytes)")
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray engine's cluster and blocks")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None: FLYWHEEL_HOME's store")
    log_mlflow: bool = Field(True, description="log the run to MLflow (`flywheel/mine`)")
    progress: bool = Field(True, description="show progress bars")

    @field_validator("workers")
    @classmethod
    def _workers_fit_cpus(cls, v: int) -> int:
        # more processes than CPUs only adds fork and pickling overhead (and memory: each holds a batch)
        cpus = usable_cpus()
        if v > cpus:
            raise ValueError(f"workers={v} is more than the {cpus} CPUs this process may use; use at most {cpus} "
                             "(0 picks min(2, CPUs))")
        return v
