"""Small presentation helpers the pages share: empty states, run pickers, formatting, placeholder highlights."""

from __future__ import annotations

import datetime as dt
import html
import math
import re
from typing import Any, Iterable

import streamlit as st

# The page files, relative to dashboard/app.py: st.page_link and st.switch_page take these paths.
PAGES = {
    "overview": "pages/overview.py",
    "datasets": "pages/datasets.py",
    "training": "pages/training.py",
    "embeddings": "pages/embeddings.py",
    "prompts": "pages/prompt_eval.py",
    "ab": "pages/ab.py",
    "gate": "pages/gate.py",
}

# Typed placeholders written by `flywheel mine`'s PII redaction: <EMAIL>, <PHONE>, <CARD>, <IP>, <IBAN>...
PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]{1,20}>")


def empty_state(what: str, command: str, more: str = "") -> None:
    """Say what is missing and the command that fills it (every page's empty state)."""
    st.info(f"No {what} yet. Run this to fill this page:", icon=":material/info:")
    st.code(command, language="bash")
    if more:
        st.caption(more)


def when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def duration(run: dict) -> str:
    if not run.get("end_time") or not run.get("start_time"):
        return "-"
    s = (run["end_time"] - run["start_time"]) / 1000
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def short(run_id: str | None) -> str:
    return (run_id or "-")[:8]


def run_label(run: dict) -> str:
    return f"{run['run_name']} · {when(run['start_time'])} · {short(run['run_id'])}"


def num(value: Any, digits: int = 3) -> str:
    """A number for a table or caption: ints as ints, floats to `digits` significant decimals, '-' for none."""
    if value is None or value == "":
        return "-"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(f):
        return "-"
    if f.is_integer() and abs(f) < 1e15:
        return f"{int(f):,}"
    return f"{f:.{digits}f}" if abs(f) >= 10 ** -digits else f"{f:.2e}"


def pvalue(p: Any) -> str:
    try:
        f = float(p)
    except (TypeError, ValueError):
        return "-"
    if math.isnan(f):
        return "-"
    return "<0.0001" if f < 1e-4 else f"{f:.4f}"


def pick_run(runs: list[dict], label: str, key: str, multi: bool = False, default_n: int = 1):
    """A selectbox (or multiselect) over runs, newest first, preselecting `?run=<id>` from the URL."""
    ids = [r["run_id"] for r in runs]
    by_id = {r["run_id"]: r for r in runs}
    wanted = st.query_params.get_all("run")
    wanted = [w for w in wanted if w in by_id]
    fmt = lambda rid: run_label(by_id[rid])  # noqa: E731
    if multi:
        default = wanted or ids[:default_n]
        chosen = st.multiselect(label, ids, default=default, format_func=fmt, key=key)
        return [by_id[r] for r in chosen]
    index = ids.index(wanted[0]) if wanted else 0
    chosen = st.selectbox(label, ids, index=index, format_func=fmt, key=key)
    return by_id.get(chosen)


def run_link(label: str, page: str, run_id: str | None) -> None:
    """A link to a dashboard page with the run preselected, or plain text when the run is unknown."""
    if run_id:
        st.page_link(PAGES[page], label=label, query_params={"run": run_id}, icon=":material/arrow_forward:")
    else:
        st.markdown(f"{label}: _unknown_")


def highlight_placeholders(text: str) -> str:
    """Markdown with `<EMAIL>`-style placeholders on an orange background (HTML escaped, never executed)."""
    out = []
    pos = 0
    for m in PLACEHOLDER.finditer(text):
        out.append(_md_escape(text[pos:m.start()]))
        out.append(f":orange-background[**{html.escape(m.group(0))}**]")
        pos = m.end()
    out.append(_md_escape(text[pos:]))
    return "".join(out)


def _md_escape(text: str) -> str:
    text = html.escape(text, quote=False)
    # Markdown control characters that would restyle a user's text; newlines kept as line breaks.
    text = re.sub(r"([\\`*_\[\]#|~$])", r"\\\1", text)
    return text.replace("\n", "  \n")


def sidebar_footer(uri: str) -> None:
    from flywheel.dashboard import store

    with st.sidebar:
        st.caption(f"Store: `{uri}`")
        if st.button("Refresh data", icon=":material/refresh:", help="Forget cached answers and re-read MLflow"):
            store.refresh()
            st.rerun()


def metrics_row(items: Iterable[tuple[str, Any]]) -> None:
    items = list(items)
    if not items:
        return
    cols = st.columns(len(items))
    for col, (label, value) in zip(cols, items):
        col.metric(label, value if isinstance(value, str) else num(value))
