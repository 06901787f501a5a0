"""A/B statistics for `flywheel ab` (and reused by `flywheel eval`): plain functions over plain data.

Layout, one concern per file:
  assign.py      deterministic salted-hash variant assignment for a serving system
  data.py        read logs/tables into columns; every unusable row counted with a reason
  stats.py       two-sample tests (Welch, Mann-Whitney from histograms, two-proportion z / Fisher exact),
                 delta-method relative lift, bootstrap CIs
  paired.py      paired designs: paired t / Wilcoxon signed-rank, blocked by item
  multiple.py    Holm / Benjamini-Hochberg via statsmodels
  bayes.py       chance-to-beat-control and expected loss (posterior quantities, not p-values)
  srm.py         sample-ratio mismatch chi-square with warning/alert thresholds
  cuped.py       CUPED variance reduction with a pre-period covariate
  sequential.py  always-valid p-values and confidence sequences (normal-mixture mSPRT)
  power.py       sample size / MDE via statsmodels power
  verdict.py     ship / don't ship / keep running / invalid, with reasons in words
  config.py      AbConfig / MetricConfig: the settings, which the engine takes as they are
  engine.py      the analysis: per-variant aggregates -> comparisons -> report dict
  looks.py       across the looks of one experiment: running minimum p, intersected confidence sequences
  report.py      report.json text and the per-metric plots
No MLflow, no YAML loading, no printing here: `pipelines/ab.py` is the shell.
"""
