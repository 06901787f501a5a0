"""The `flywheel` command line. Each stage lives in its own module and registers its command(s) here.

Stage modules import only light things at module level (typer, pydantic, the config helpers): torch,
transformers and mlflow are imported inside the commands, so `flywheel --help` answers at once.
"""

from __future__ import annotations

import importlib
import sys

import typer

from flywheel.foundation.errors import FlywheelError

app = typer.Typer(
    name="flywheel",
    help="Rated chat logs -> datasets -> LoRA adapters -> evaluated, gated and published models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order is the order of `flywheel --help`, which is the order of the loop.
STAGE_MODULES = [
    "flywheel.pipelines.mine",
    "flywheel.pipelines.train",
    "flywheel.pipelines.embeddings",
    "flywheel.pipelines.eval",
    "flywheel.pipelines.ab",
    "flywheel.pipelines.gate",
    "flywheel.pipelines.publish",
    "flywheel.pipelines.loop",
    "flywheel.pipelines.dashboard_cmd",
    "flywheel.pipelines.demo",
]

for _name in STAGE_MODULES:
    try:
        _mod = importlib.import_module(_name)
    except ModuleNotFoundError as _e:  # a stage not written yet; any other import error is a bug and raises
        if _e.name != _name:
            raise
        continue
    _mod.register(app)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except FlywheelError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
