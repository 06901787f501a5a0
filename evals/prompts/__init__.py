"""Prompt evaluation (`flywheel eval`): plain functions over plain data; the shell is `pipelines/eval.py`.

config.py     EvalConfig: the `flywheel eval` settings
suite.py      a config resolved before generation: cases, variants, params, judge, embedder, results dict
templates.py  versioned prompt templates (`{{ field }}`), field checks before generation
cases.py      cases from a mined dataset dir, a JSONL/YAML cases file, or an oasst1 message table
generate.py   targets (local HF model +/- LoRA, OpenAI-compatible endpoint), batched seeded generation, disk cache
nll.py        reference mean token NLL, teacher-forced (the gate's primary metric; lower is better)
scorers.py    assertions, exact match, ROUGE-L, embedding similarity, PII, consistency, judge parsing
harness.py    the variant x target x case matrix, cells with CIs, paired comparisons (A/B engine)
"""
