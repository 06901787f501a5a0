"""`flywheel bench-embeddings` end to end: leaderboard contract, MLflow parent/child runs, warm cache rerun with
identical numbers, bad input as one-line errors. Small data (a mined dataset + 40 STS pairs), the two fast models."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.pipelines.config import ConfigError, load_config
from flywheel.pipelines.embeddings import COLUMNS, EmbeddingsConfig, run_bench_embeddings

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ["model", "task", "ndcg@10", "mrr@10", "map@100", "recall@1", "recall@5", "recall@10", "recall@100",
            "spearman", "pearson", "texts_per_s", "latency_p50_ms", "latency_p95_ms", "dims"]

FACTS = [("Lentils have about 9 g of protein per 100 g cooked.", "how much protein is in lentils?"),
         ("Vitamin B12 is not reliably found in plant foods.", "do vegans need a b12 supplement?"),
         ("Soak dried chickpeas overnight before cooking.", "how do I prepare dried chickpeas?"),
         ("Tofu is made by coagulating soy milk and pressing the curds.", "how is tofu made?"),
         ("Oats contain beta-glucan, a soluble fibre.", "what fibre is in oats?"),
         ("Spinach iron is non-heme and better absorbed with vitamin C.", "how to absorb iron from spinach?")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    ds = root / "mined"
    ds.mkdir()
    recs = []
    for i, (ctx, q) in enumerate(FACTS * 2):
        q = q if i < len(FACTS) else q.replace("?", " please?")
        recs.append({"id": f"r{i}", "rating": 5, "source": "t", "prompt_variant": "v1", "context": ctx,
                     "cluster": f"c{i}",
                     "messages": [{"role": "system", "content": f"Answer using this context:\n{ctx}"},
                                  {"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]})
    (ds / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:9]))
    (ds / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[9:]))
    (ds / "manifest.json").write_text(json.dumps({"version": "v-test-1"}))
    sts = root / "sts"
    sts.mkdir()
    rows = []
    for i in range(40):
        ctx, q = FACTS[i % len(FACTS)]
        other = FACTS[(i + 1 + i // 6) % len(FACTS)][0]
        pair = (ctx, ctx.replace(".", " indeed."), 4.6) if i % 2 == 0 else (ctx, other, 0.4 + (i % 5) * 0.5)
        rows.append(f"g\tf\t2012\t{i:04d}\t{pair[2]:.3f}\t{pair[0]}\t{pair[1]}")
    (sts / "sts-dev.csv").write_text("\n".join(rows) + "\n")
    pairs = root / "dups.jsonl"  # labelled pairs for threshold calibration
    pairs.write_text("".join(json.dumps({"text1": c, "text2": q, "label": 1}) + "\n" for c, q in FACTS) +
                     "".join(json.dumps({"text1": FACTS[i][0], "text2": FACTS[i - 1][1], "label": 0}) + "\n"
                             for i in range(len(FACTS))))
    return {"mined": ds, "sts": sts, "pairs": pairs}


@pytest.mark.slow
def test_bench_end_to_end_mlflow_and_warm_rerun(data, mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = EmbeddingsConfig(models=["static-64", "paraphrase-MiniLM-L3-v2"], tasks=[str(data["mined"]), str(data["sts"]),
                                                                      str(data["pairs"])],
                           out=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                           speed={"n_texts": 16, "n_latency": 5}, stats={"n_boot": 200})
    res = run_bench_embeddings(cfg, quiet=True)
    out = res["out"]
    with open(out / "leaderboard.csv") as f:
        header = next(csv.reader(f))
    assert header[:15] == CONTRACT and header == COLUMNS
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert len(rows) == 6
    dups = [r for r in rows if r["task"] == "dups"]
    assert len(dups) == 2
    assert all(0 < float(r["dup_best_f1"]) <= 1 and r["dup_recall_at_fixed"] != "" for r in dups)
    dom = [r for r in rows if r["task"] == "domain:mined"]
    sts = [r for r in rows if r["task"] == "sts"]
    assert len(dom) == len(sts) == 2
    assert all(r["spearman"] == "" and float(r["ndcg@10"]) > 0 for r in dom)  # n/a cells are empty
    assert all(r["ndcg@10"] == "" and -1 <= float(r["spearman"]) <= 1 for r in sts)
    assert {r["dims"] for r in rows} == {"64", "384"}
    assert all(float(r["texts_per_s"]) > 0 and float(r["latency_p95_ms"]) >= float(r["latency_p50_ms"]) for r in rows)
    assert sorted(r["vs_best"].split(" ")[0] for r in dom)[0] == "best"
    cmp = [c for c in csv.DictReader(open(out / "comparisons.csv")) if c["task"] == "domain:mined"]
    # 12 queries < min_queries: a difference is either significant or explicitly "too few queries to tell"
    assert len(cmp) == 1 and (cmp[0]["significant"] == "True" or cmp[0]["verdict"].startswith("too few"))
    assert all(float(r["ndcg@10_ci_low"]) <= float(r["ndcg@10"]) <= float(r["ndcg@10_ci_high"]) for r in dom)
    for name in ("leaderboard.md", "comparisons.csv", "calibration.csv", "quality_vs_speed.png", "summary.json"):
        assert (out / name).stat().st_size > 0
    assert len(list((out / "per_query").glob("*.csv"))) == 6

    client = MlflowClient()
    parent = client.get_run(res["run_id"])
    assert parent.data.tags["flywheel.stage"] == "embeddings"
    assert parent.data.tags["flywheel.input.dataset_version"] == "v-test-1"
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.name == "flywheel/embeddings"
    arts = {a.path for a in client.list_artifacts(res["run_id"])}
    assert {"leaderboard.csv", "leaderboard.md", "quality_vs_speed.png", "comparisons.csv"} <= arts
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{res['run_id']}'")
    assert len(children) == 6
    for ch in children:
        assert {"model", "task", "dims", "size_mb"} <= set(ch.data.params)
        assert "per_query.csv" in {a.path for a in client.list_artifacts(ch.info.run_id)}
    dom_child = next(c for c in children if c.data.params["task"] == "domain:mined"
                     and c.data.params["model"] == "static-64")
    assert "ndcg_at_10" in dom_child.data.metrics and "recall_at_100" in dom_child.data.metrics

    # Warm rerun: nothing encoded, no model loaded, the same leaderboard byte for byte.
    first = (out / "leaderboard.csv").read_bytes()
    res2 = run_bench_embeddings(cfg, quiet=True)
    assert (out / "leaderboard.csv").read_bytes() == first
    children2 = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{res2['run_id']}'")
    assert {c.data.params["encoded"] for c in children2} == {"0"}
    assert {c.data.params["speed_cached"] for c in children2} == {"True"}


def test_config_errors(tmp_path):
    from flywheel.pipelines.embeddings import demo_config

    cfg = demo_config(tmp_path / "ds", tmp_path / "out")
    assert cfg.models == ["static-64", "paraphrase-MiniLM-L3-v2"] and cfg.tasks[0] == str(tmp_path / "ds")
    assert load_config(EmbeddingsConfig, ROOT / "configs" / "embeddings.yaml").models[2] == "all-mpnet-base-v2"
    with pytest.raises(ConfigError, match="modles: unknown key"):
        load_config(EmbeddingsConfig, None, ["modles=[x]"])
    with pytest.raises(ConfigError, match="duplicates"):
        load_config(EmbeddingsConfig, None, ["models=[static-64,static-64]"])


def test_cli_bad_input_is_one_line_exit_2(data, tmp_path):
    cmd = [sys.executable, "-c", "from flywheel.pipelines.cli import main; main()", "bench-embeddings",
           "models=[./no/such/model]", f"tasks=[{data['sts']}]", f"out={tmp_path / 'o'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "path does not exist" in p.stderr
    bad = tmp_path / "beir"
    (bad / "qrels").mkdir(parents=True)
    (bad / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n')
    (bad / "queries.jsonl").write_text('{"_id": "q1", "text": "y"}\n')
    (bad / "qrels" / "test.tsv").write_text("q1\td1\t1\nq1\td2\t1\nq1\td3\t1\n")
    p = subprocess.run(cmd[:4] + ["models=[static-64]", f"tasks=[{bad}]"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "2 judgement(s) name unknown documents (first: 'd2' at line 2)" in p.stderr
