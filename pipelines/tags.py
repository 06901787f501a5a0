"""Every MLflow tag name Flywheel writes or reads, in one place.

Lineage is walked through these tags (a Modelfile back to the logs), so a writer and a reader spelling one
differently breaks it silently: stages, the registry, the lineage walk and the dashboard all import the names
from here. `python -m flywheel.pipelines.tags` prints the README's table of them (from `ALL`).

Inputs: `tracking.start_run(stage, inputs={IN_MINE_RUN: id})` writes the tag `flywheel.input.mine_run`; the
`IN_*` constants are those kinds, `input_tag(kind)` the tag name.
"""

from __future__ import annotations

PREFIX = "flywheel."

# -- every run (tracking.start_run)
STAGE = "flywheel.stage"                      # the stage that logged the run (mine, train, gate, ...)
GIT_COMMIT = "flywheel.git_commit"            # HEAD of the user's repository: the working directory's checkout
VERSION = "flywheel.version"                  # the Flywheel package version that wrote the run
SOURCE_COMMIT = "flywheel.source_commit"      # Flywheel's own checkout commit (editable installs; -dirty if changed)
INPUT = "flywheel.input."                     # + kind: what the run consumed (a run id, a dataset version, ...)

# -- input kinds (the keys of start_run(inputs=...))
IN_LOGS = "logs"                              # mine: the log files read, comma-separated
IN_LOGS_SHA256 = "logs_sha256"                # mine: their hashes (16 hex each), same order
IN_CASES = "cases"                            # eval: the case set file
IN_DATASET_VERSION = "dataset_version"        # the mined dataset a run trained/evaluated on
IN_MINE_RUN = "mine_run"
IN_TRAIN_RUN = "train_run"
IN_EVAL_RUN = "eval_run"
IN_SAMPLE_EVAL_RUN = "sample_eval_run"
IN_GATE_RUN = "gate_run"
IN_CANDIDATE = "candidate"                    # gate: the candidate model reference (runs:/..., models:/...)
IN_CHAMPION = "champion"                      # gate: <registered model>/<version> it was compared with
IN_MODEL_URI = "model_uri"                    # publish: the model reference that was published
IN_PUBLISH_RUN = "publish_run"

# -- mine
DATASET_VERSION = "flywheel.dataset_version"  # content hash of the mined dataset (also on model versions)
DATASET_PATH = "flywheel.dataset_path"        # where the mine run wrote it
# -- train
BASE_MODEL = "flywheel.base_model"
BASE_MODEL_SHA256 = "flywheel.base_model_sha256"
BACKEND = "flywheel.backend"
DEVICE = "flywheel.device"
TRAIN_NPROC = "flywheel.train.nproc"
TRAIN_METHOD = "flywheel.train.method"        # sft | dpo
TRAIN_STATUS = "flywheel.train.status"        # finished | interrupted
TRAIN_RESUMED_FROM_CHECKPOINT = "flywheel.train.resumed_from_checkpoint"
TRAIN_RESUMED_FROM_RUN = "flywheel.train.resumed_from_run"
# -- embeddings
EMBEDDINGS_TASKS = "flywheel.embeddings.tasks"
EMBEDDINGS_VS_BEST = "flywheel.embeddings.vs_best"
# -- prompts (flywheel eval); prompt-registry versions carry SHA256/VERSION/SOURCE
EVAL_PRIMARY_METRIC = "flywheel.eval.primary_metric"
EVAL_SAMPLE_RUN = "flywheel.eval.sample_run"  # on an eval run: the run with the gate's sample generations
EVAL_SAMPLE_OF = "flywheel.eval.sample_of"    # on that sample run: the eval run it illustrates
PROMPT_SHA256 = "flywheel.sha256"
PROMPT_VERSION = "flywheel.version"
PROMPT_SOURCE = "flywheel.source"
# -- ab
AB_SRM_STATUS = "flywheel.ab.srm_status"
AB_DESIGN = "flywheel.ab.design"
AB_CONTROL = "flywheel.ab.control"
AB_VERDICT = "flywheel.ab.verdict."           # + variant (sanitised to MLflow's key charset)
AB_EXPERIMENT = "flywheel.ab.experiment"      # the experiment key: looks of one experiment share it
# -- gate (and the model versions it registers)
GATE_DECISION = "flywheel.gate.decision"      # pass | fail | error
GATE_VARIANT = "flywheel.gate.variant"
PROMOTED_VERSION = "flywheel.promoted_version"
PROMPT_VARIANT = "flywheel.prompt_variant"
SYSTEM_PROMPT = "flywheel.system_prompt"
# -- registry: the champion alias history on model versions (pipelines/registry.py)
CHAMPION_SINCE = "flywheel.champion_since"
CHAMPION_UNTIL = "flywheel.champion_until"
PROMOTED_BY_GATE_RUN = "flywheel.promoted_by_gate_run"
PROMOTIONS = "flywheel.promotions"
PROMOTION_LEASE = "flywheel.promotion_lease"  # registered model, server stores: the optimistic promotion lease
PROMOTION_PENDING = "flywheel.promotion_pending"  # model version: a promotion begun, not yet committed (JSON)
# -- publish
MODELFILE_PATH = "flywheel.modelfile_path"
PUBLISH_GGUF_ADAPTER = "flywheel.publish.gguf_adapter"
PUBLISH_MODE = "flywheel.publish.mode"
# -- flywheel run (the loop)
LOOP_SOURCES = "flywheel.loop.sources"        # JSON: the file slices and trace windows the loop mined
RUN_STATUS = "flywheel.run.status"

MLFLOW_PARENT_RUN = "mlflow.parentRunId"      # MLflow's own: nested runs


def input_tag(kind: str) -> str:
    """`mine_run` -> `flywheel.input.mine_run`."""
    return INPUT + kind


def ab_verdict_tag(variant: str) -> str:
    """The verdict tag of one variant, in MLflow's tag-key charset (`@` and the like replaced)."""
    from flywheel.pipelines.tracking import sanitize_metric_name

    return sanitize_metric_name(AB_VERDICT + variant)


def inputs_of(tags: dict | None) -> dict[str, str]:
    """{kind: value} of a run's `flywheel.input.<kind>` tags."""
    return {k[len(INPUT):]: v for k, v in (tags or {}).items() if k.startswith(INPUT)}


ALL: dict[str, str] = {name: value for name, value in globals().items()
                       if name.isupper() and name != "PREFIX" and isinstance(value, str) and value.startswith(PREFIX)}
INPUT_KINDS: dict[str, str] = {name: value for name, value in globals().items()
                               if name.startswith("IN_") and isinstance(value, str)}


def markdown_table() -> str:
    """The README's tag table: constant, tag, and the comment beside it in this file."""
    import re
    from pathlib import Path

    source = Path(__file__).read_text(encoding="utf-8")
    notes = {m.group(1): m.group(2).strip() for m in re.finditer(r'^([A-Z0-9_]+) = "[^"]*" *(?:# (.*))?$', source, re.M)
             if m.group(2)}
    rows = ["| tag | constant | meaning |", "|---|---|---|"]
    rows += [f"| `{value}` | `{name}` | {notes.get(name, '')} |" for name, value in ALL.items()]
    rows += [f"| `{INPUT}{kind}` | `input_tag({name})` | {notes.get(name, '')} |" for name, kind in INPUT_KINDS.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
