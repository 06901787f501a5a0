"""Gate and registry: gate decisions with their reports, who held `champion` when, published Modelfiles."""

from __future__ import annotations

import datetime as dt
import json

import pandas as pd
import plotly.express as px
import streamlit as st

from flywheel.dashboard import store, ui

DECISION_COLOR = {"pass": "green", "fail": "red", "error": "orange"}

st.title("Gate and registry")

# ------------------------------------------------------------------------------------------- gate history
st.header("Gate decisions")
gates = store.runs("gate", parents_only=True)
if not gates:
    ui.empty_state("gate decisions", "flywheel gate --candidate URI --config configs/gate.yaml --promote")
else:
    history = pd.DataFrame([{
        "when": ui.when(r["start_time"]),
        "decision": r["tags"].get("flywheel.gate.decision", "?"),
        "candidate": r["tags"].get("flywheel.input.candidate", "-"),
        "eval run": ui.short(r["tags"].get("flywheel.input.eval_run")),
        "promoted": r["tags"].get("flywheel.promoted_version", ""),
        "run": r["run_name"],
    } for r in gates])
    counts = history["decision"].value_counts()
    ui.metrics_row([("Decisions", str(len(history)))] + [(d, str(int(counts.get(d, 0))))
                                                         for d in ("pass", "fail", "error")])
    st.dataframe(history, hide_index=True, width="stretch")
    gate = ui.pick_run(gates, "Report of", key="gate_run")
    decision = gate["tags"].get("flywheel.gate.decision", "?")
    st.markdown(f"Decision: :{DECISION_COLOR.get(decision, 'gray')}-badge[{decision.upper()}] · "
                f"candidate `{gate['tags'].get('flywheel.input.candidate', '-')}`")
    report = store.artifact_text(gate["run_id"], "gate_report.md")
    if report:
        with st.container(border=True):
            st.markdown(report)
    else:
        st.caption("No `gate_report.md` on this run.")
    gate_json = store.artifact_json(gate["run_id"], "gate.json")
    if gate_json is not None:
        with st.expander("gate.json"):
            st.json(gate_json, expanded=False)

# ------------------------------------------------------------------------------------------- registry
st.header("Registry: champion alias history")
models = store.registered_models()
if not models:
    ui.empty_state("registered models", "flywheel gate --candidate URI --config configs/gate.yaml --promote",
                   "`flywheel demo` registers `flywheel-demo` when its gate passes.")
else:
    name = st.selectbox("Registered model", [m["name"] for m in models], key="gate_model")
    versions = store.model_versions(name)
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    table, spans = [], []
    for v in versions:
        t = v["tags"]
        since, until = t.get("flywheel.champion_since"), t.get("flywheel.champion_until")
        table.append({"version": v["version"], "aliases": ", ".join(v["aliases"]), "champion since": since or "",
                      "champion until": until or ("now" if "champion" in v["aliases"] else ""),
                      "promoted by gate run": ui.short(t.get("flywheel.promoted_by_gate_run")),
                      "dataset": (t.get("flywheel.dataset_version") or t.get("flywheel.input.dataset_version")
                                  or "")[:12],
                      "registered": ui.when(v["creation_timestamp"]), "source run": ui.short(v["run_id"])})
        # `flywheel.promotions` keeps every interval (a version can come back); since/until is the latest one.
        try:
            intervals = json.loads(t.get("flywheel.promotions", "[]"))
        except json.JSONDecodeError:
            intervals = []
        if not intervals and since:
            intervals = [{"since": since, "until": until}]
        for span in intervals:
            if not isinstance(span, dict) or not span.get("since"):
                continue
            current = "champion" in v["aliases"] and not span.get("until")
            spans.append({"version": f"v{v['version']}", "start": span["since"], "end": span.get("until") or now,
                          "held": "current champion" if current else "past",
                          "gate run": ui.short(span.get("gate_run"))})
    if spans:
        spans = pd.DataFrame(spans)
        # ISO strings from different writers (offsets, 'Z', none): parse all as UTC, drop what does not parse.
        spans["start"] = pd.to_datetime(spans["start"], utc=True, errors="coerce", format="ISO8601")
        spans["end"] = pd.to_datetime(spans["end"], utc=True, errors="coerce", format="ISO8601")
        spans = spans.dropna(subset=["start", "end"])
    if len(spans):
        fig = px.timeline(spans, x_start="start", x_end="end", y="version", color="held",
                          color_discrete_map={"current champion": "#2e7d32", "past": "#90a4ae"})
        fig.update_layout(height=120 + 40 * len(spans), margin=dict(l=10, r=10, t=10, b=10))
        st.plotly_chart(fig, width="stretch")
    else:
        st.caption("No version carries `flywheel.champion_since` yet: the alias has never been moved by a gate.")
    st.dataframe(pd.DataFrame(table), hide_index=True, width="stretch")

# ------------------------------------------------------------------------------------------- modelfiles
st.header("Published Modelfiles")
publishes = store.runs("publish", parents_only=True)
if not publishes:
    ui.empty_state("published Modelfiles", "flywheel publish models:/flywheel-demo@champion")
else:
    pub = ui.pick_run(publishes, "Publication", key="gate_publish")
    st.caption(f"from `{pub['tags'].get('flywheel.input.model_uri', '?')}` → "
               f"`{pub['tags'].get('flywheel.modelfile_path', '?')}`")
    modelfile = store.artifact_text(pub["run_id"], "Modelfile")
    if modelfile:
        st.code(modelfile, language="dockerfile")
    else:
        st.caption("No `Modelfile` artifact on this run.")
    readme = store.artifact_text(pub["run_id"], "README.md")
    if readme:
        with st.expander("README (lineage)"):
            st.markdown(readme)
