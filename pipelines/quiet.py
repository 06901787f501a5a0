"""Third-party progress bars, INFO logs and FutureWarnings off by default; `flywheel -v` leaves them on.

Flywheel draws its own progress (Rich) and prints its own summary; transformers' LOAD REPORT tables, tqdm bars from
datasets / huggingface_hub / transformers / sentence-transformers, MLflow's INFO lines and artifact bars, and the
libraries' FutureWarnings bury it under hundreds of lines. Each library is switched off with its own documented
switch. The environment variables are set before those libraries are imported (they read them at import) and are
inherited by child processes (the mine worker pool, training subprocesses); libraries already imported are told
directly. Variables the user set are left alone. What matters still shows: Flywheel's own warnings and errors,
MLflow warnings, transformers/datasets errors, every raised exception.
"""

from __future__ import annotations

import os
import sys
import warnings

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # also silences the LOAD REPORT table (a logger.warning)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TQDM_DISABLE": "1",  # tqdm >= 4.66 reads TQDM_<kwarg> defaults: sentence-transformers' encode bars etc.
}
# FutureWarnings raised inside these packages are about their next release, not about the user's data.
NOISY_PACKAGES = ("transformers", "datasets", "huggingface_hub", "mlflow", "trl", "peft", "accelerate",
                  "sentence_transformers", "torch", "pydantic", "alembic", "sqlalchemy")


def quiet_third_party() -> None:
    """Switch the libraries' own progress bars, INFO logs and FutureWarnings off (idempotent)."""
    import logging

    # MLflow logs every SQLAlchemy error with the full SQL before raising it; the raised error carries the same
    # message, so the log only buries Flywheel's one-line error (e.g. "database or disk is full").
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    pattern = r"(%s)(\.|$)" % "|".join(NOISY_PACKAGES)
    warnings.filterwarnings("ignore", category=FutureWarning, module=pattern)
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    if "datasets" in sys.modules:
        from datasets.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "mlflow" in sys.modules:
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)
