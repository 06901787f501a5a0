"""`log_traces: true` in `flywheel eval`: every generation as an MLflow trace, its scores as assessments.

    flywheel eval --config configs/eval/demo.yaml log_traces=true

One trace per row of the matrix (case x variant x target), in the eval run's experiment and linked to the eval's
parent run (the trace's source run), so MLflow's trace view lists what each prompt variant and target answered:
a CHAT_MODEL span with the rendered prompt messages as inputs and the answer in OpenAI `choices` as outputs
(status ERROR with the error message when the generation failed), tags `target`, `variant`, `case_id`. Each
metric of the row with a value is a feedback assessment named after the metric (`mlflow.log_feedback`): source
LLM_JUDGE for the metrics the scorer registry marks `judged`, CODE for the rest. What the gate decides on stays
`results.json`; the traces are for reading the answers.
"""

from __future__ import annotations

import math
from typing import Any

CODE_SOURCE = "flywheel-eval"


def log_generation_traces(rows: list[dict], run_id: str, experiment_id: str, judge_model: str | None = None) -> int:
    """One trace per row (harness.run_matrix's), scores as assessments; returns the number of traces."""
    import mlflow
    from mlflow.tracing.constant import TraceMetadataKey

    ids = [_trace(r, run_id, experiment_id, TraceMetadataKey.SOURCE_RUN) for r in rows]
    # MLflow exports traces from a background queue by default: all of them must be in the store before an
    # assessment can name one. One flush for the whole batch (each costs ~2 s).
    mlflow.flush_trace_async_logging()
    for tid, r in zip(ids, rows):
        _assess(tid, r["metrics"], judge_model)
    return len(ids)


def _trace(row: dict, run_id: str, experiment_id: str, source_run_key: str) -> str:
    import mlflow
    from mlflow.entities import SpanStatusCode, SpanType

    tags = {"target": str(row["target"]), "variant": str(row["variant"]), "case_id": str(row["case_id"])}
    span = mlflow.start_span_no_context("generate", span_type=SpanType.CHAT_MODEL, experiment_id=experiment_id,
                                        inputs={"messages": row["prompt"]}, tags=tags,
                                        metadata={source_run_key: run_id})
    span.set_outputs({"choices": [{"message": {"role": "assistant", "content": row["output"]}}]})
    if row.get("error"):
        span.set_status(SpanStatusCode.ERROR)
        span.set_attribute("error", str(row["error"])[:1000])
    span.end()
    return span.trace_id


def _assess(trace_id: str, metrics: dict[str, Any], judge_model: str | None) -> None:
    import mlflow
    from mlflow.entities import AssessmentSource

    from flywheel.evals.prompts.scorers import METRICS

    for name, value in sorted(metrics.items()):
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue  # no score (failed generation, metric not available): nothing to record
        judged = name in METRICS and METRICS[name].judged  # the registry says which scores a judge gave
        source = AssessmentSource(source_type="LLM_JUDGE", source_id=judge_model or "judge") \
            if judged else AssessmentSource(source_type="CODE", source_id=CODE_SOURCE)
        mlflow.log_feedback(trace_id=trace_id, name=name, value=float(value), source=source)
