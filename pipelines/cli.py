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



@app.callback()
def _global_options(
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show third-party progress bars, INFO logs and FutureWarnings "
                                      "(transformers, datasets, huggingface_hub, MLflow); quiet by default."),
) -> None:
    # Runs before any command, so the switches are in the environment before the heavy libraries are imported.
    if not verbose:
        from flywheel.pipelines.quiet import quiet_third_party

        quiet_third_party()


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
    "flywheel.pipelines.config_cmd",
    "flywheel.pipelines.server",
]

# Every stage ships with the package: a module that fails to import is a packaging bug and must fail loudly.
for _name in STAGE_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app()
    except Exception as e:
        # A tracking server that went away (or refuses the credentials) is the user's to fix: one line naming
        # the server, exit 2, also when a stage already wrapped the MLflow error in its own message.
        from flywheel.pipelines.server import connection_error
        from flywheel.pipelines.tracking import tracking_uri

        msg = connection_error(e, tracking_uri())
        if msg is not None:
            typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
            sys.exit(2)
        if isinstance(e, FlywheelError):
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            sys.exit(e.exit_code)
        if isinstance(e, OSError):
            # The machine said no (permission, full disk, missing file): its message names the path; a traceback
            # would add nothing a user can act on. Exit 2 as for any other bad input; 1 stays "gate says fail".
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            sys.exit(2)
        if "database or disk is full" in str(e):  # sqlite's words, through SQLAlchemy and MLflow
            typer.secho(f"error: {tracking_uri()}: database or disk is full", fg=typer.colors.RED, err=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
