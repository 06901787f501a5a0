"""What each DDP rank runs: the `flywheel train` recipe under torchrun (or `accelerate launch`).

    torchrun --standalone --nproc-per-node 4 -m flywheel.pipelines.train_worker --config configs/train/smollm2-lora.yaml \
        dataset=out/mined [--resume]

`flywheel train ... nproc=N` starts this itself (and opens the MLflow run in the parent); launched by hand, rank 0
opens the run. Either way rank 0 alone prints, logs to MLflow, writes checkpoints and the adapter. A bad config or
dataset is one line on stderr and exit 2 on every rank (torchrun then stops them all).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flywheel.pipelines.train_worker")
    ap.add_argument("--config", "-c", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    from flywheel.foundation.errors import FlywheelError

    try:
        from flywheel.pipelines.config import load_config
        from flywheel.foundation.io import write_json
        from flywheel.pipelines.train import RESULT_ENV, _print_summary, run_train
        from flywheel.training.config import TrainConfig

        cfg = load_config(TrainConfig, args.config, args.overrides)
        result = run_train(cfg, resume=args.resume, progress=args.progress and rank == 0)
    except FlywheelError as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return e.exit_code
    if rank == 0:
        if os.environ.get(RESULT_ENV):
            write_json(os.environ[RESULT_ENV], result)
        else:  # launched by hand: nobody else reports
            _print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
