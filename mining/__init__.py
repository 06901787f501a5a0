"""Pure data logic of `flywheel mine`: readers, curation, PII redaction, dedupe, split, preferences, card.

Plain functions over plain data: no MLflow, no config parsing, no printing (the stage shell is
`pipelines/mine.py`)."""
