"""Datasets: every `flywheel mine` run, its filter funnel, split sizes and sample records (PII placeholders lit)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from flywheel.dashboard import store, ui

st.title("Datasets")
runs = store.runs("mine", parents_only=True)
if not runs:
    ui.empty_state("mined datasets", "flywheel mine LOGS... --out DIR",
                   "`flywheel demo` mines its embedded demo logs first.")
    st.stop()

table = pd.DataFrame([{
    "version": r["tags"].get("flywheel.dataset_version", "")[:12],
    "mined": ui.when(r["start_time"]),
    "read": r["metrics"].get("read"),
    "kept": r["metrics"].get("kept"),
    "rejected": r["metrics"].get("rejected"),
    "train": r["metrics"].get("split.train"),
    "eval": r["metrics"].get("split.eval"),
    "preferences": r["metrics"].get("preferences"),
    "path": r["tags"].get("flywheel.dataset_path", ""),
} for r in runs])
st.dataframe(table, hide_index=True, width="stretch")

run = ui.pick_run(runs, "Dataset version", key="datasets_run")
m = run["metrics"]
st.subheader(f"Version `{run['tags'].get('flywheel.dataset_version', '?')}`")
st.caption(f"Written to `{run['tags'].get('flywheel.dataset_path', '?')}` · run `{run['run_id']}`")
ui.metrics_row([("Read", m.get("read")), ("Kept", m.get("kept")), ("Rejected", m.get("rejected")),
                ("Train", m.get("split.train")), ("Eval", m.get("split.eval")),
                ("Preferences", m.get("preferences"))])

# ------------------------------------------------------------------------------------------- funnel
# The invariant the mine stage keeps: read == kept + rejected + sum(filtered.*); each bar is what is left.
filtered = sorted(((k[len("filtered."):], v) for k, v in m.items() if k.startswith("filtered.") and v),
                  key=lambda kv: -kv[1])
left, right = st.columns([3, 2])
with left:
    st.markdown("**Filter funnel**")
    if "read" in m:
        labels, values, remaining = ["read"], [m["read"]], m["read"]
        for reason, count in filtered:
            remaining -= count
            labels.append(f"− {reason} ({count:,.0f})")
            values.append(remaining)
        if m.get("rejected"):
            remaining -= m["rejected"]
            labels.append(f"− rejected, unreadable ({m['rejected']:,.0f})")
            values.append(remaining)
        labels.append("kept")
        values.append(m.get("kept", remaining))
        fig = go.Figure(go.Funnel(y=labels, x=values, textinfo="value+percent initial"))
        fig.update_layout(height=80 + 42 * len(labels), margin=dict(l=10, r=10, t=10, b=10))
        st.plotly_chart(fig, width="stretch")
        if abs(remaining - m.get("kept", remaining)) > 0.5:
            st.warning(f"Counts do not reconcile: read − drops = {remaining:,.0f}, kept = {m.get('kept'):,.0f}")
    else:
        st.caption("This run logged no `read` metric.")
with right:
    st.markdown("**Dropped, by reason**")
    drops = pd.DataFrame(filtered + ([("rejected (unreadable)", m["rejected"])] if m.get("rejected") else []),
                         columns=["reason", "records"])
    if drops.empty:
        st.caption("Nothing was filtered.")
    else:
        st.dataframe(drops, hide_index=True, width="stretch")

pii = {k[len("pii."):]: v for k, v in m.items() if k.startswith("pii.") and v}
if pii:
    st.caption("PII redacted into placeholders: " + ", ".join(f"**{v:,.0f}** {k}" for k, v in sorted(pii.items())))

manifest = store.artifact_json(run["run_id"], "manifest.json")
if isinstance(manifest, dict):
    with st.expander("Manifest: inputs and counts per input"):
        inputs = manifest.get("inputs")
        if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict):
            per_input = pd.DataFrame([{k: (", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict)
                                           else v) for k, v in i.items()} for i in inputs])
            st.dataframe(per_input, hide_index=True, width="stretch")
        st.json(manifest.get("counts", {}), expanded=False)
        st.json(manifest.get("splits", {}), expanded=False)

# ------------------------------------------------------------------------------------------- samples
st.subheader("Sample records")
samples = store.artifact_jsonl(run["run_id"], "samples.jsonl")
if not samples:
    st.caption("No `samples.jsonl` artifact on this run.")
else:
    n_placeholders = sum(len(ui.PLACEHOLDER.findall(str(msg.get("content", ""))))
                         for rec in samples for msg in rec.get("messages", []) if isinstance(msg, dict))
    st.caption(f"{len(samples)} kept train records logged with the run; "
               f"{n_placeholders} PII placeholders, highlighted like :orange-background[**&lt;EMAIL&gt;**].")
    only_pii = st.toggle("Only records with PII placeholders", value=False)
    shown = 0
    for rec in samples:
        messages = [msg for msg in rec.get("messages", []) if isinstance(msg, dict)]
        has = any(ui.PLACEHOLDER.search(str(msg.get("content", ""))) for msg in messages)
        if only_pii and not has:
            continue
        shown += 1
        title = f"{rec.get('id', '?')[:12]} · rating {rec.get('rating', '?')} · {rec.get('source', '')}"
        with st.expander(title + (" · PII" if has else ""), expanded=shown <= 2):
            for msg in messages:
                st.markdown(f"**{msg.get('role', '?')}**: " + ui.highlight_placeholders(str(msg.get("content", ""))))
    if shown == 0:
        st.caption("No sample record carries a placeholder.")
