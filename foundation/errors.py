"""The one exception type users see as a one-line message (exit code 2) instead of a traceback.

training/ and evals/ may raise it too: it is plain Python, no MLflow or config parsing behind it.
Messages name the file, line and field where there is one: `logs.jsonl:17: rating: 'five' is not 1-5`.
"""


class FlywheelError(Exception):
    exit_code = 2


class InputError(FlywheelError, ValueError):
    """Bad input data or arguments (missing file, unknown format, malformed records past repair)."""
