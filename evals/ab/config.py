"""`flywheel ab analyze` settings: the experiment's columns, the metrics and how they are tested.

Run with: flywheel ab analyze LOGS... --config configs/ab.yaml [key=value ...]
The engine (`flywheel.evals.ab.engine.analyze`) takes this model as it is: one default per setting, here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from flywheel.evals.ab.verdict import GUARDRAIL_MARGIN
from flywheel.foundation.config import StageConfig


class MetricConfig(StageConfig):
    """One outcome column and how it is compared between variants."""

    name: str = Field(description="the metric's name in the report")
    column: str | None = Field(None, description="the log column; default: name; dotted for nested fields "
                               "(scores.overall)")
    kind: Literal["auto", "mean", "ordinal", "rate"] = Field(
        "auto", description="mean: Welch; ordinal: Mann-Whitney; rate: two proportions; auto: 0/1 -> rate, "
        "<= 15 levels -> ordinal, else mean")
    threshold: float | None = Field(None, description="a rate from a score: success = value >= threshold")
    min: float | None = Field(None, description="values below this are counted as out of range and left out")
    max: float | None = Field(None, description="values above this are counted as out of range and left out")
    higher_is_better: bool = Field(True, description="the direction of improvement")
    guardrail: bool = Field(False, description="non-inferiority test: not worse than the control by more than "
                            "`margin`")
    margin: float = Field(GUARDRAIL_MARGIN, ge=0, description="guardrail margin")
    margin_relative: bool = Field(True, description="margin as a fraction of the control mean (else absolute)")
    covariate: str | None = Field(None, description="CUPED: pre-period column of the same unit")

    @property
    def source_column(self) -> str:
        """The log column the metric reads: `column`, else the metric's name."""
        return self.column or self.name


class SrmConfig(StageConfig):
    """Sample-ratio mismatch: is the split what was configured?"""

    warning_p: float = Field(0.01, gt=0, lt=1, description="warn below this p (Statsig-like)")
    alert_p: float = Field(0.001, gt=0, lt=1, description="below this p the verdict is 'invalid'")


class SequentialConfig(StageConfig):
    """Always-valid p-values / confidence sequences, for peeking."""

    enabled: bool = Field(True, description="compute always-valid p-values and confidence sequences")
    tuning_n: float = Field(1000, gt=0, description="units per arm where the confidence sequence is tightest")


DEFAULT_METRICS = [
    MetricConfig(name="rating", column="rating", kind="ordinal", min=1, max=5),
    MetricConfig(name="success", column="rating", kind="rate", threshold=4, min=1, max=5),
    MetricConfig(name="latency_ms", column="latency_ms", kind="mean", guardrail=True, higher_is_better=False, min=0),
    MetricConfig(name="tokens", column="tokens", kind="mean", guardrail=True, higher_is_better=False, min=0),
]


class AbConfig(StageConfig):
    """The whole A/B analysis."""

    unit: str | None = Field("user_id", description="randomisation unit column; null = every row is its own unit")
    variant: str = Field("prompt_variant", description="the column naming each row's variant")
    control: str | None = Field(None, description="default: 'control' if present, else the first variant name "
                                "in sort order")
    variants: list[str] | None = Field(None, description="allowed variant names; others are counted as "
                                       "unknown_variant")
    allocation: dict[str, float] | None = Field(None, description="configured split for the SRM check; "
                                                "None = equal")
    paired: bool = Field(False, description="the unit is an item scored under every variant")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level after correction")
    correction: Literal["holm", "bh", "bonferroni", "none"] = Field(
        "holm", description="multiple-comparison correction across variants x metrics")
    primary: str | None = Field(None, description="metric that decides ship; default: the first non-guardrail "
                                "metric")
    metrics: list[MetricConfig] = Field(default_factory=lambda: list(DEFAULT_METRICS),
                                        description="the outcomes to compare")
    mde: float = Field(0.05, gt=0, description="planned minimum detectable effect (relative to the control unless "
                       "mde_relative is false)")
    mde_relative: bool = Field(True, description="mde as a fraction of the control mean")
    power: float = Field(0.8, gt=0, lt=1, description="planned power for the MDE")
    decision: Literal["fixed", "sequential"] = Field("fixed", description="fixed-horizon or always-valid p-values "
                                                     "decide")
    srm: SrmConfig = Field(default_factory=SrmConfig, description="sample-ratio mismatch check")
    sequential: SequentialConfig = Field(default_factory=SequentialConfig, description="always-valid inference")
    n_boot: int = Field(2000, ge=100, description="bootstrap resamples for the cross-check CI")
    seed: int = Field(0, description="seed for the bootstrap")
    out: str | None = Field(None, description="directory for report.json + plots; None = only MLflow artifacts")
    force: bool = Field(False, description="replace an existing `out` Flywheel did not write")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: Flywheel's store")
    log_mlflow: bool = Field(True, description="log a run in the flywheel/ab experiment")

    # Variant names are compared as strings (a CSV column of 0/1 arms reads as "0"/"1"); YAML may give numbers.
    @field_validator("control", mode="before")
    @classmethod
    def _str_control(cls, v):
        return None if v is None else str(v)

    @field_validator("variants", mode="before")
    @classmethod
    def _str_variants(cls, v):
        return None if v is None else [str(x) for x in v] if isinstance(v, list) else v

    @field_validator("allocation", mode="before")
    @classmethod
    def _str_allocation(cls, v):
        return {str(k): x for k, x in v.items()} if isinstance(v, dict) else v


def with_flags(cfg: AbConfig, *, unit=None, variant=None, metric=(), control=None, paired=False, alpha=None,
                out=None) -> AbConfig:
    """Command-line flags over the config. `--metric X` picks configured metric X, or adds column X (auto kind)."""
    upd: dict = {}
    if unit is not None:
        upd["unit"] = None if unit.lower() in ("none", "null", "") else unit
    if variant is not None:
        upd["variant"] = variant
    if control is not None:
        upd["control"] = control
    if paired:
        upd["paired"] = True
    if alpha is not None:
        upd["alpha"] = alpha
    if out is not None:
        upd["out"] = str(out)
    if metric:
        known = {m.name: m for m in cfg.metrics}
        upd["metrics"] = [known.get(name) or MetricConfig(name=name, column=name) for name in metric]
        if cfg.primary and cfg.primary not in metric:
            upd["primary"] = None
    if variant is not None and variant != cfg.variant and control is None:
        # a different variant column makes the configured names meaningless
        upd["variants"], upd["allocation"], upd["control"] = None, None, None
    data = cfg.model_dump()
    data.update({k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in upd.items()})
    if "metrics" in upd:
        data["metrics"] = [m.model_dump() for m in upd["metrics"]]
    return AbConfig.model_validate(data)
