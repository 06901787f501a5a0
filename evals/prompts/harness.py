"""The matrix runner: prompt variants x targets x cases -> per-case rows, per-cell means with CIs, comparisons.

Plain data in, plain data out; the shell (`pipelines/eval.py`) adds MLflow, progress bars and files.

Order of work, and why:
1. `validate` everything that can be wrong before a single token is generated: template fields against every
   case, every assertion against its case, every target's base/adapter/endpoint.
2. Per target (loaded once, unloaded after): per variant, generate `repeat` times (cached), then reference NLL
   and, for preference pairs, which answer the target prefers (both teacher-forced, cached); score each case.
   A failed generation is a row with `failed` set: no metric has a value for it (never a zero that looks like a
   score), its cell counts it in `n_failed`, comparisons leave its pairs out.
3. Embedding similarity in one batch over all rows (one model load), then cells and paired comparisons.

Cell CIs: Wilson for 0/1 metrics (statsmodels), Student t for the rest (scipy). Comparisons reuse the A/B engine
(`flywheel.evals.ab.paired.compare_paired`, `flywheel.evals.ab.multiple.adjust_pvalues`): pairs are aligned by case id, so the
case-to-case variance cancels; p-values are corrected per metric across all compared pairs (Holm by default):
each metric is its own question, and the gate decides on one primary metric.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Sequence

from flywheel.evals.prompts import scorers
from flywheel.evals.prompts.cases import Case
from flywheel.evals.prompts.generate import GenParams
from flywheel.foundation.cache import JsonCache
from flywheel.evals.prompts.templates import PromptTemplate, check_fields
from flywheel.foundation.errors import InputError

DEFAULT_METRICS = scorers.default_metrics()
# pass_rate / error_rate / consistency are computed whenever they apply; naming them is allowed (the gate lists
# the metrics its rules read) and changes nothing.
KNOWN_METRICS = set(scorers.METRICS)

Embedder = Callable[[Sequence[str], Sequence[str]], list[float]]
Judge = Callable[[str, str, str | None], float | None]
Progress = Callable[..., None]  # (phase, advance, detail=None)


def case_assertions(case: Case, suite: Sequence[dict]) -> list[dict]:
    return list(suite) + list(case.assertions)


def validate_static(cases: Sequence[Case], variants: Sequence[PromptTemplate], target_names: Sequence[str],
                    suite_assertions: Sequence[dict], metrics: Sequence[str]) -> None:
    """Every check that needs neither a model nor a target. Raises InputError naming file, line and field."""
    if not cases:
        raise InputError("no cases to evaluate")
    if not variants:
        raise InputError("no prompt variants")
    if not target_names:
        raise InputError("no targets")
    for kind, names in (("variant", [v.name for v in variants]), ("target", list(target_names))):
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise InputError(f"duplicate {kind} name {sorted(dup)[0]!r}: names label the matrix, make them unique")
    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown:
        raise InputError(f"metrics: unknown {unknown[0]!r} (known: {', '.join(sorted(KNOWN_METRICS))})")
    if "preference_accuracy" in metrics and not any(c.is_pair for c in cases):
        raise InputError("metrics: preference_accuracy needs preference pairs (prompt/chosen/rejected): give "
                         "cases=<mined dataset dir> (its preferences_eval.jsonl) or a .jsonl of pairs")
    check_fields(variants, cases)
    for i, a in enumerate(suite_assertions):
        scorers.validate_assertion(a, f"config assertions[{i}]", reference="(suite)")
    for c in cases:
        for a in c.assertions:
            scorers.validate_assertion(a, c.source, c.reference)
        for a in suite_assertions:
            if a.get("type") == "equals" and a.get("value") is None and c.reference is None:
                raise InputError(f"{c.source}: reference: required by the suite's `equals` assertion")


def validate(cases: Sequence[Case], variants: Sequence[PromptTemplate], targets: Sequence[Any],
             suite_assertions: Sequence[dict], metrics: Sequence[str]) -> None:
    """`validate_static`, then each target's own check (base model present, endpoint reachable)."""
    validate_static(cases, variants, [t.name for t in targets], suite_assertions, metrics)
    for t in targets:
        t.check()


def render(case: Case, variant: PromptTemplate) -> list[dict]:
    """System + earlier turns + the question, as the variant words them."""
    msgs = variant.render(case.fields())
    return msgs[:-1] + list(case.history) + msgs[-1:]


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def run_matrix(cases: Sequence[Case], variants: Sequence[PromptTemplate], targets: Sequence[Any], *,
               params: GenParams, cache: JsonCache, metrics: Sequence[str] = DEFAULT_METRICS,
               suite_assertions: Sequence[dict] = (), repeat: int = 1, embedder: Embedder | None = None,
               judge: Judge | None = None, nll_batch_size: int = 4, nll_max_length: int = 384,
               progress: Progress | None = None) -> dict:
    """Returns {"rows": [...], "notes": [...]}: one row per case x variant x target (never fewer).

    `progress(phase, advance, detail=None)`: phase "generate"/"nll", or "failed" with the failure's message as it
    happens. An endpoint that fails `max_consecutive_failures` times in a row raises EndpointAborted."""
    metrics = list(metrics)
    validate(cases, variants, targets, suite_assertions, metrics)
    if repeat < 1:
        raise InputError(f"repeat: must be >= 1, got {repeat}")
    notes: list[str] = []
    if repeat > 1 and not params.do_sample:
        notes.append(f"repeat={repeat} with greedy decoding: repeats are identical, consistency is 1 by "
                     f"construction (set generation.do_sample=true)")
    if "judge_score" in metrics and judge is None:
        notes.append("judge_score skipped: no judge endpoint configured")
    if "embedding_similarity" in metrics and embedder is None:
        notes.append("embedding_similarity skipped: no embedding model")

    def tick(n: int, error: str | None = None) -> None:
        if progress:
            progress("generate", n)
            if error:
                progress("failed", 1, error)

    rows: list[dict] = []
    for target in targets:
        for m in ("nll", "preference_accuracy"):
            if m in metrics and getattr(target, "kind", "") != "hf":
                notes.append(f"{m} not available for target {target.name!r} ({target.kind}: no teacher forcing)")
        if getattr(target, "kind", "") == "openai" and not getattr(target, "cacheable", True):
            notes.append(f"target {target.name!r}: not cached: the server reports nothing that identifies its "
                         f"weights (set the target's `revision` to cache it)")
        for variant in variants:
            prompts = [render(c, variant) for c in cases]
            runs = [target.generate(prompts, params, cache, repeat=r, progress=tick) for r in range(repeat)]
            nll_vals: list[float | None] = [None] * len(cases)
            if "nll" in metrics:
                with_ref = [i for i, c in enumerate(cases) if c.reference]
                vals = target.nll([prompts[i] for i in with_ref], [cases[i].reference for i in with_ref], cache,
                                  batch_size=nll_batch_size, max_length=nll_max_length)
                for i, v in zip(with_ref, vals):
                    nll_vals[i] = v
                if progress:
                    progress("nll", 1)
            prefs = _preferences(target, cases, prompts, cache, nll_batch_size, nll_max_length) \
                if "preference_accuracy" in metrics else [None] * len(cases)
            for i, case in enumerate(cases):
                gens = [run[i] for run in runs]
                rows.append(_score_row(case, variant, target, prompts[i], gens, nll_vals[i], metrics,
                                       suite_assertions, judge, preference=prefs[i]))
        target.unload()

    if "embedding_similarity" in metrics and embedder is not None:
        _embedding_similarity(rows, embedder, cache)
    if "judge_score" in metrics and judge is not None:
        notes += judge_notes(rows)
    return {"rows": rows, "notes": notes}


def _preferences(target: Any, cases: Sequence[Case], prompts: list, cache: JsonCache, batch_size: int,
                 max_length: int) -> list[float | None]:
    """preference_accuracy per case (None for a case that is not a pair): teacher-forced, like nll."""
    out: list[float | None] = [None] * len(cases)
    pairs = [i for i, c in enumerate(cases) if c.is_pair]
    vals = target.preference([prompts[i] for i in pairs], [cases[i].chosen for i in pairs],
                             [cases[i].rejected for i in pairs], cache, batch_size=batch_size, max_length=max_length)
    for i, v in zip(pairs, vals):
        out[i] = v
    return out


def judge_notes(rows: Sequence[dict]) -> list[str]:
    """Say plainly how many answers the judge scored, and why the others have no score."""
    scored = sum(1 for r in rows if r["metrics"].get("judge_score") is not None)
    miss = Counter()
    for r in rows:
        miss.update({k.split(".", 1)[1]: v for k, v in r["misses"].items() if k.startswith("judge_score.")})
    if not miss:
        return []
    why = ", ".join(f"{v} {k}" for k, v in sorted(miss.items()))
    if scored == 0:
        return [f"judge_score: the judge produced no score at all ({why}); check the judge model and that it "
                f"replies `Score: N`"]
    return [f"judge_score: {sum(miss.values())} judgements without a score ({why}); {scored} rows scored"]


def _embedding_similarity(rows: list[dict], embedder: Embedder, cache: JsonCache) -> None:
    """One batch over every (output, reference) pair not in the cache; the embedder loads only if needed.

    Cached only when the embedder has a `name` (its identity); a bare function is always recomputed. A failed row
    is not embedded: its similarity is missing, like its other metrics."""
    name = getattr(embedder, "name", None)
    for r in rows:
        if r["reference"] is not None and r["failed"]:
            r["metrics"]["embedding_similarity"] = None
    todo = [r for r in rows if r["reference"] is not None and not r["failed"]]
    pairs = [(o, r["reference"]) for r in todo for o in r["outputs"]]
    keys = [cache.key("emb", name, o, ref) for o, ref in pairs] if name else [None] * len(pairs)
    sims: list[float | None] = [None] * len(pairs)
    miss = []
    for i, k in enumerate(keys):
        hit = cache.get("emb", k) if k else None
        if hit is not None:
            sims[i] = hit["sim"]
        else:
            miss.append(i)
    if miss:
        vals = embedder([pairs[i][0] for i in miss], [pairs[i][1] for i in miss])
        for i, v in zip(miss, vals):
            sims[i] = v
            if keys[i]:
                cache.put("emb", keys[i], {"sim": v})
    k = 0
    for r in todo:
        n = len(r["outputs"])
        r["metrics"]["embedding_similarity"] = _mean(sims[k:k + n])
        k += n


def _score_row(case: Case, variant: PromptTemplate, target: Any, prompt: list[dict], gens: list, nll: float | None,
               metrics: Sequence[str], suite_assertions: Sequence[dict], judge: Judge | None,
               preference: float | None = None) -> dict:
    """One row. A failed generation (any repeat) fails the whole row: every metric but error_rate is None, never
    a zero that looks like a score, and the row is counted in its cell's `n_failed`."""
    assertions = case_assertions(case, suite_assertions)
    errors = [g.error for g in gens]
    error = next((e for e in errors if e), None)
    failed = error is not None
    misses: Counter = Counter()
    per_rep: list[dict[str, float | None]] = []
    assertion_rows: list[dict] = []
    for rep, g in enumerate(gens):
        m: dict[str, float | None] = {"error_rate": 1.0 if g.error else 0.0}
        if assertions:
            oks = []
            for a in assertions:
                ok, why = (None, f"generation failed: {error}") if failed else \
                    scorers.check_assertion(a, g.text, case.reference)
                oks.append(ok)
                m[f"assert.{scorers.assertion_name(a)}"] = None if ok is None else float(ok)
                if rep == 0:
                    assertion_rows.append({"name": scorers.assertion_name(a), "type": a["type"], "passed": ok,
                                           "reason": why})
            m["pass_rate"] = None if failed else float(all(oks))
        out = scorers.Scored(text=g.text, reference=case.reference, question=case.question,
                             latency_ms=g.latency_ms, tokens=g.tokens, judge=judge,
                             batch_latency_ms=getattr(g, "batch_latency_ms", None))
        m.update(scorers.score_output(metrics, out, failed=failed, misses=misses))
        per_rep.append(m)
    keys = sorted({k for m in per_rep for k in m})
    agg = {k: _mean([m.get(k) for m in per_rep]) for k in keys}
    if "nll" in metrics and nll is not None:
        agg["nll"] = None if failed else nll
    if "preference_accuracy" in metrics and preference is not None:
        agg["preference_accuracy"] = None if failed else preference
    if len(gens) > 1:
        agg["consistency"] = None if failed else scorers.consistency_rate([g.text for g in gens])
    return {
        "case_id": case.id, "variant": variant.name, "variant_version": variant.version, "target": target.name,
        "source": case.source, "question": case.question, "reference": case.reference,
        "prompt": prompt, "output": gens[0].text, "outputs": [g.text for g in gens],
        "error": error, "errors": errors, "failed": failed, "misses": dict(misses),
        "retries": sum(getattr(g, "retries", 0) or 0 for g in gens),
        "cached": all(g.cached for g in gens), "assertions": assertion_rows, "metrics": agg,
    }


def failures(rows: Sequence[dict]) -> dict[str, dict]:
    """Per cell (`target/variant`): rows, failed generations, their rate, scorer misses by kind, retries taken."""
    out: dict[str, dict] = {}
    for r in rows:
        f = out.setdefault(cell_label(r["variant"], r["target"]),
                           {"target": r["target"], "variant": r["variant"], "rows": 0, "failed": 0,
                            "misses": Counter(), "retries": 0, "first_error": None})
        f["rows"] += 1
        f["failed"] += bool(r["failed"])
        f["misses"].update(r["misses"])
        f["retries"] += r["retries"]
        f["first_error"] = f["first_error"] or r["error"]
    for f in out.values():
        f["failure_rate"] = f["failed"] / f["rows"] if f["rows"] else 0.0
        f["misses"] = dict(sorted(f["misses"].items()))
    return out


# -- cells ----------------------------------------------------------------------------------------------------

def mean_ci(values: Sequence[float], *, binary: bool, alpha: float = 0.05) -> tuple[float | None, float | None,
                                                                                   float | None]:
    """(mean, ci_low, ci_high). Wilson for 0/1 data, Student t otherwise; None where undefined (n < 2)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return None, None, None
    mean = sum(xs) / n
    if binary and all(x in (0.0, 1.0) for x in xs):
        from statsmodels.stats.proportion import proportion_confint

        lo, hi = proportion_confint(int(sum(xs)), n, alpha=alpha, method="wilson")
        return mean, float(lo), float(hi)
    if n < 2:
        return mean, None, None
    from scipy import stats

    if max(xs) == min(xs):  # no spread (e.g. one batch's shared latency): a zero-width interval, no warning
        return mean, mean, mean
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf(1 - alpha / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def cells(rows: Sequence[dict], alpha: float = 0.05) -> list[dict]:
    """One cell per variant x target x metric, in matrix order: each metric with a value in the cell, or missing
    for a reason (a failed generation, a scorer's miss). `n` counts values; `n_failed` the cell's failed
    generations (no value in any metric); `n_missing` the scorer's misses by kind (e.g. unparseable judgements)."""
    order: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        order.setdefault((r["variant"], r["target"]), []).append(r)
    out = []
    for (variant, target), rs in order.items():
        n_failed = sum(1 for r in rs if r.get("failed"))
        misses: Counter = Counter()
        for r in rs:
            misses.update(r.get("misses", {}))
        names = {k for r in rs for k, v in r["metrics"].items() if v is not None}
        names |= {k.split(".", 1)[0] for k in misses}
        if n_failed == len(rs):  # nothing succeeded: show every metric the rows name, each with no value
            names |= {k for r in rs for k in r["metrics"]}
        for metric in sorted(names):
            vals = [r["metrics"].get(metric) for r in rs]
            vals = [v for v in vals if v is not None]
            binary = scorers.is_binary(metric)
            mean, lo, hi = mean_ci(vals, binary=binary, alpha=alpha)
            cell = {"variant": variant, "target": target, "metric": metric, "mean": mean, "ci_low": lo,
                    "ci_high": hi, "n": len(vals), "n_failed": n_failed, "direction": scorers.direction(metric)}
            missing = {k.split(".", 1)[1]: v for k, v in misses.items() if k.split(".", 1)[0] == metric}
            if missing:
                cell["n_missing"] = missing
            out.append(cell)
    return out


# -- comparisons ----------------------------------------------------------------------------------------------

def cell_label(variant: str, target: str) -> str:
    return f"{target}/{variant}"


def auto_pairs(variants: Sequence[str], targets: Sequence[str]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Each variant vs the first variant on the same target; each target vs the first target with the same
    variant. ((control_variant, control_target), (treatment_variant, treatment_target))."""
    pairs = []
    for t in targets:
        for v in variants[1:]:
            pairs.append(((variants[0], t), (v, t)))
    for v in variants:
        for t in targets[1:]:
            pairs.append(((v, targets[0]), (v, t)))
    return pairs


def configured_pairs(pairs: Sequence[tuple[dict, dict]], variants: Sequence[str],
                     targets: Sequence[str]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Configured (control, treatment) cells, each {variant, target}, as `compare`'s pairs. A side that names no
    cell is an InputError, raised before any generation."""
    out = []
    for i, (control, treatment) in enumerate(pairs):
        for side in (control, treatment):
            if side.get("variant") not in variants or side.get("target") not in targets:
                raise InputError(f"compare.pairs[{i}]: {side} names no cell (variants {sorted(set(variants))}, "
                                 f"targets {sorted(set(targets))})")
        out.append(((control["variant"], control["target"]), (treatment["variant"], treatment["target"])))
    return out


def compare(rows: Sequence[dict], pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]], *,
            metrics: Sequence[str] | None = None, alpha: float = 0.05, correction: str = "holm",
            test: str = "auto") -> tuple[list[dict], list[str]]:
    """Paired comparisons on the same cases; returns (comparisons, notes). Keys as `flywheel ab --json` plus
    which cells were compared, the metric's direction and a plain-words `outcome`."""
    from flywheel.evals.ab.multiple import adjust_pvalues
    from flywheel.evals.ab.paired import compare_paired

    by_cell: dict[tuple[str, str], dict[str, dict]] = {}
    failed: set[tuple[str, str, str]] = set()
    for r in rows:
        by_cell.setdefault((r["variant"], r["target"]), {})[r["case_id"]] = r["metrics"]
        if r.get("failed"):
            failed.add((r["variant"], r["target"], r["case_id"]))
    notes: list[str] = []
    skipped: dict[str, int] = {}
    empty: set[str] = set()
    out: list[dict] = []
    for (cv, ct), (tv, tt) in pairs:
        for cell in ((cv, ct), (tv, tt)):
            if cell not in by_cell:
                raise InputError(f"comparison names cell variant={cell[0]!r} target={cell[1]!r}, which is not in "
                                 f"the matrix")
        c_rows, t_rows = by_cell[(cv, ct)], by_cell[(tv, tt)]
        common = [i for i in c_rows if i in t_rows]
        # A failed generation on either side: the pair is missing in every metric, and said so.
        ids = [i for i in common if (cv, ct, i) not in failed and (tv, tt, i) not in failed]
        n_failed_pairs = len(common) - len(ids)
        if n_failed_pairs:
            notes.append(f"{cell_label(tv, tt)} vs {cell_label(cv, ct)}: {n_failed_pairs} of {len(common)} cases "
                         f"left out of every comparison (failed generation)")
        names = sorted({k for i in common for k in c_rows[i]} & {k for i in common for k in t_rows[i]})
        if metrics is not None:
            names = [n for n in names if n in metrics or n.startswith("assert.") and "pass_rate" in metrics]
        for metric in names:
            if scorers.direction(metric) == "none":
                continue
            cvals = [_nan(c_rows[i].get(metric)) for i in ids]
            tvals = [_nan(t_rows[i].get(metric)) for i in ids]
            if not any(math.isfinite(x) for x in cvals) or not any(math.isfinite(x) for x in tvals):
                empty.add(metric)  # e.g. a judge that scored nothing: not "too few pairs", no values at all
                continue
            if sum(1 for a, b in zip(cvals, tvals) if math.isfinite(a) and math.isfinite(b)) < 2:
                skipped[metric] = skipped.get(metric, 0) + 1  # e.g. an assertion only one case carries
                continue
            try:
                res = compare_paired(cvals, tvals, metric=metric, variant=cell_label(tv, tt),
                                     control_name=cell_label(cv, ct), alpha=alpha, test=test)
            except InputError as e:
                notes.append(f"not compared: {e}")
                continue
            res.update(control_variant=cv, control_target=ct, treatment_variant=tv, treatment_target=tt,
                       direction=scorers.direction(metric), n_failed_pairs=n_failed_pairs)
            out.append(res)
    if empty:
        notes.append("not compared (no values in a compared cell): " + ", ".join(sorted(empty)))
    few = sorted(set(skipped) - empty)
    if few:
        notes.append("not compared (fewer than 2 paired cases): " + ", ".join(few))
    for metric in sorted({c["metric"] for c in out}):
        fam = [c for c in out if c["metric"] == metric]
        for c, p in zip(fam, adjust_pvalues([c["p_value"] for c in fam], correction)):
            c["p_adjusted"] = p
            c["correction"] = correction
            c["outcome"] = _outcome(c, alpha)
    return out, notes


def _nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def _outcome(c: dict, alpha: float) -> str:
    p = c.get("p_adjusted")
    if p is None or not math.isfinite(p) or p >= alpha or c["estimate"] == 0:
        return "inconclusive"
    up = c["estimate"] > 0
    return "better" if up == (c["direction"] == "higher") else "worse"
