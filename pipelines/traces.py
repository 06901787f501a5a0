"""`mlflow-traces:<experiment>` inputs: rated MLflow traces read from the tracking server, page by page.

    flywheel mine mlflow-traces:assistant logs/extra.jsonl --out data/assistant traces.rating_name=thumbs

`trace_input(experiment, cfg)` returns a `flywheel.mining.engine.StreamInput` that the mining engine consumes like
a file: `MlflowClient.search_traces` pages of `PAGE_SIZE` (oldest first, so memory stays flat in the number of
traces), each trace as `Trace.to_dict()` mapped in the worker pool by `flywheel.mining.traces`. The filter is
`traces.filter_string` AND a time window (`traces.max_age_days`, or `since_ms` from the loop: only traces newer
than the last run's newest). The manifest's input entry records the experiment, the filter and the newest trace
time (`newest_trace_ms`), which is what the next run starts after.
"""

from __future__ import annotations

import time
from typing import Iterator

from flywheel.foundation.errors import InputError
from flywheel.mining.config import MineConfig
from flywheel.mining.engine import StreamInput
from flywheel.mining.traces import SOURCE, source_name, trace_time_ms

PREFIX = SOURCE + ":"
PAGE_SIZE = 500  # traces per search page: one page's dicts are what the reader holds


def is_source(arg: object) -> bool:
    return isinstance(arg, str) and arg.startswith(PREFIX)


def window_filter(user_filter: str | None, since_ms: int | None) -> str | None:
    """The user's filter AND the time window, as one MLflow trace filter string."""
    parts = [f"({user_filter})" if user_filter and " or " in user_filter.lower() else user_filter,
             f"trace.timestamp_ms > {since_ms}" if since_ms is not None else None]
    return " AND ".join(p for p in parts if p) or None


def trace_input(experiment: str, cfg: MineConfig, since_ms: int | None = None,
                page_size: int = PAGE_SIZE) -> StreamInput:
    """The traces of `experiment` (a name, or an id) as a mining input."""
    from mlflow import MlflowClient

    from flywheel.pipelines import tracking

    if not experiment:
        raise InputError(f"{PREFIX}: name the experiment, e.g. {PREFIX}assistant")
    client = MlflowClient(tracking_uri=tracking.tracking_uri(cfg.tracking_uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        exp = _by_id(client, experiment)
    if exp is None:
        raise InputError(f"{PREFIX}{experiment}: no such experiment in the tracking store")
    tc = cfg.traces
    if tc.max_age_days is not None:
        window = int((time.time() - tc.max_age_days * 86400) * 1000)
        since_ms = window if since_ms is None else max(since_ms, window)
    flt = window_filter(tc.filter_string, since_ms)
    meta = {"experiment": experiment, "filter": tc.filter_string, "since_ms": since_ms, "newest_trace_ms": None}
    return StreamInput(source_name(experiment), "traces", _pages(client, exp.experiment_id, flt, page_size, meta),
                       SOURCE, meta)


def _by_id(client, experiment_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_experiment(experiment_id)
    except MlflowException:
        return None


def _pages(client, experiment_id: str, flt: str | None, page_size: int, meta: dict) -> Iterator[list]:
    """One list of (ordinal, trace dict) per page; records the newest trace time in `meta` as it goes."""
    from mlflow.exceptions import MlflowException

    token, n = None, 0
    while True:
        try:
            page = client.search_traces(locations=[experiment_id], filter_string=flt, max_results=page_size,
                                        order_by=["timestamp_ms ASC"], page_token=token)
        except MlflowException as e:
            raise InputError(f"{PREFIX}{meta['experiment']}: trace search failed (filter {flt!r}): "
                             f"{str(e).splitlines()[0]}") from None
        batch = []
        for t in page:
            n += 1
            d = t.to_dict()
            ms = trace_time_ms(d)
            if ms is not None and (meta["newest_trace_ms"] is None or ms > meta["newest_trace_ms"]):
                meta["newest_trace_ms"] = ms
            batch.append((n, d))
        if batch:
            yield batch
        token = page.token
        if not token:
            return


def has_new(source: str, cfg: MineConfig, since_ms: int | None) -> bool:
    """Whether `source` (`mlflow-traces:<experiment>`) holds a trace newer than `since_ms` under the filter and
    the time window: the loop's "new logs?" check, which reads at most one trace."""
    stream = trace_input(source[len(PREFIX):], cfg, since_ms, page_size=1)
    return next(iter(stream.batches), None) is not None


def resolve_inputs(inputs: list, cfg: MineConfig, since: dict[str, int] | None = None) -> list:
    """`mine`'s inputs with each `mlflow-traces:<experiment>` argument as its StreamInput; `since`: per source
    name, only traces newer than this (ms), as the loop passes it."""
    return [trace_input(x[len(PREFIX):], cfg, (since or {}).get(x)) if is_source(x) else x for x in inputs]
