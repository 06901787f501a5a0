"""Application-side logging: what an assistant calls to record each interaction and, later, its rating.

    from flywheel.pipelines import applog

    log = applog.ChatLogger(experiment="assistant")                      # MLflow traces if a tracking URI is set,
    variant = log.variant(user_id, ab_experiment="prompt-v2", variants=["v1", "v2"])   # else chat-log JSONL
    tid = log.interaction(user_id=user_id, messages=[{"role": "user", "content": q}], answer=a,
                          context=docs, prompt_variant=variant, latency_ms=812, tokens=431, model="llama3")
    log.rating(tid, 5)                                                   # a thumbs-up/stars arriving later

With a tracking URI (`tracking_uri=`, or `MLFLOW_TRACKING_URI`) each interaction is one MLflow trace shaped like
autologging's: a CHAT_MODEL root span with the `messages` as inputs and OpenAI `choices` as outputs, a RETRIEVER
child span holding the context documents, the latency as the span's duration, token usage as
`mlflow.chat.tokenUsage`, the prompt variant and model as trace tags, the user and session as MLflow's standard
trace metadata. A rating is a feedback assessment (`mlflow.log_feedback`, source HUMAN) named `user_rating`.
`flywheel mine mlflow-traces:<experiment>` reads them back.

Without one, each interaction is a canonical chat-log line appended to `log_path` (`"rating": null` until rated)
and a later rating is a line `{"rating_for": id, "rating": r}` that `flywheel mine` merges into the interaction.
Both carry what `flywheel ab analyze` needs: user_id, prompt_variant, rating, latency_ms, tokens.

Importing this module loads neither torch nor transformers (an application's import time); mlflow is imported only
when a trace is written.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from flywheel.evals.ab.assign import assign
from flywheel.foundation.errors import InputError

RATING_NAME = "user_rating"  # the `traces.rating_name` default of `flywheel mine`


class ChatLogger:
    """Records interactions as MLflow traces (a tracking URI is set) or as chat-log JSONL lines (`log_path`)."""

    def __init__(self, experiment: str = "assistant", tracking_uri: str | None = None,
                 log_path: str | Path | None = None, rating_name: str = RATING_NAME):
        # an explicit tracking_uri decides ("" = none); else a log_path means JSONL; else MLFLOW_TRACKING_URI
        if tracking_uri is None:
            tracking_uri = None if log_path is not None else os.environ.get("MLFLOW_TRACKING_URI")
        self.tracking_uri = tracking_uri or None
        if not self.tracking_uri and log_path is None:
            raise InputError("applog: set a tracking URI (MLFLOW_TRACKING_URI) or a log_path for chat-log JSONL")
        self.experiment, self.rating_name = experiment, rating_name
        self.log_path = Path(log_path) if log_path is not None else None
        self._experiment_id: str | None = None

    @property
    def uses_mlflow(self) -> bool:
        return bool(self.tracking_uri)

    @staticmethod
    def variant(user_id: str | int, ab_experiment: str, variants: Mapping[str, float] | Sequence[str]) -> str:
        """The user's prompt variant: the stable hash assignment the A/B analysis assumes."""
        return assign(user_id, ab_experiment, variants)

    def interaction(self, *, messages: list[dict], answer: str, user_id: str | int | None = None,
                    prompt_variant: str | None = None, context: Sequence[str] | str | None = None,
                    latency_ms: float | None = None, tokens: int | Mapping[str, int] | None = None,
                    model: str | None = None, session_id: str | None = None, rating: int | bool | None = None,
                    ) -> str:
        """Record one answered request; returns its id (the trace id, or the JSONL conversation_id)."""
        docs = [context] if isinstance(context, str) else list(context or [])
        if self.uses_mlflow:
            tid = self._trace(messages, answer, user_id, prompt_variant, docs, latency_ms, tokens, model, session_id)
        else:
            tid = uuid.uuid4().hex
            total = tokens.get("total_tokens") if isinstance(tokens, Mapping) else tokens
            self._append({"conversation_id": tid, "messages": [*messages, {"role": "assistant", "content": answer}],
                          "rating": None, "retrieved_context": docs or None, "prompt_variant": prompt_variant,
                          "model": model, "user_id": None if user_id is None else str(user_id),
                          "session_id": session_id, "latency_ms": latency_ms, "tokens": total, "time": time.time()})
        if rating is not None:
            self.rating(tid, rating)
        return tid

    def rating(self, trace_id: str, rating: int | bool, source_id: str = "user") -> None:
        """A rating that arrives later (1-5 stars, or a bool thumbs up/down) for the interaction `trace_id`."""
        if isinstance(rating, bool):
            value: Any = rating
        elif isinstance(rating, int) and 1 <= rating <= 5:
            value = rating
        else:
            raise InputError(f"applog: rating {rating!r} is not 1-5 or a bool")
        if self.uses_mlflow:
            import mlflow
            from mlflow.entities import AssessmentSource

            from mlflow.exceptions import MlflowException

            mlflow.set_tracking_uri(self.tracking_uri)
            source = AssessmentSource(source_type="HUMAN", source_id=source_id)
            try:
                mlflow.log_feedback(trace_id=trace_id, name=self.rating_name, value=value, source=source)
            except MlflowException as e:
                # Traces are exported by a background queue (MLflow's default): a rating given right after its
                # interaction can name a trace not in the store yet. Flushing costs ~2 s, so only then.
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                mlflow.flush_trace_async_logging()
                mlflow.log_feedback(trace_id=trace_id, name=self.rating_name, value=value, source=source)
        else:
            # a bool becomes the miner's default thumbs mapping, so JSONL and traces give the same dataset
            self._append({"rating_for": trace_id, "rating": (5 if value else 1) if isinstance(value, bool)
                          else value, "time": time.time()})

    # ---------------------------------------------------------------------------------------------- internals
    def _append(self, obj: dict) -> None:
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with open(self.log_path, "a", encoding="utf-8") as f:  # one write per line: appends do not interleave
            f.write(line)

    def _trace(self, messages, answer, user_id, variant, docs, latency_ms, tokens, model, session_id) -> str:
        import mlflow
        from mlflow.entities import Document, SpanType

        mlflow.set_tracking_uri(self.tracking_uri)
        if self._experiment_id is None:
            exp = mlflow.get_experiment_by_name(self.experiment)
            self._experiment_id = exp.experiment_id if exp else mlflow.create_experiment(self.experiment)
        end = time.time_ns()
        start = end - int((latency_ms or 0) * 1e6)
        tags = {k: str(v) for k, v in (("prompt_variant", variant), ("model", model)) if v is not None}
        meta = {k: str(v) for k, v in (("mlflow.trace.user", user_id), ("mlflow.trace.session", session_id))
                if v is not None}
        root = mlflow.start_span_no_context("chat", span_type=SpanType.CHAT_MODEL, inputs={"messages": messages},
                                            tags=tags, metadata=meta, experiment_id=self._experiment_id,
                                            start_time_ns=start)
        if docs:
            ret = mlflow.start_span_no_context("retrieve", span_type=SpanType.RETRIEVER, parent_span=root,
                                               inputs={"query": messages[-1].get("content")}, start_time_ns=start)
            ret.set_outputs([Document(page_content=d) for d in docs])
            ret.end(end_time_ns=start)
        if tokens is not None:
            usage = dict(tokens) if isinstance(tokens, Mapping) else {"total_tokens": int(tokens)}
            root.set_attribute("mlflow.chat.tokenUsage", usage)
        root.set_outputs({"choices": [{"message": {"role": "assistant", "content": answer}}]})
        root.end(end_time_ns=end)
        return root.trace_id


_default: ChatLogger | None = None


def _logger() -> ChatLogger:
    global _default
    if _default is None:
        _default = ChatLogger(log_path=os.environ.get("FLYWHEEL_CHAT_LOG") or None) \
            if not os.environ.get("MLFLOW_TRACKING_URI") else ChatLogger()
    return _default


def log_interaction(**kw: Any) -> str:
    """`ChatLogger.interaction` on the default logger (MLFLOW_TRACKING_URI, else the JSONL at FLYWHEEL_CHAT_LOG)."""
    return _logger().interaction(**kw)


def log_rating(trace_id: str, rating: int | bool) -> None:
    """`ChatLogger.rating` on the default logger."""
    _logger().rating(trace_id, rating)
