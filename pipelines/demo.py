"""`flywheel demo`: the whole loop on embedded, generated demo logs, offline. Filled in as stages land."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo() -> None:
        """Run the whole loop on embedded demo logs (offline, CPU)."""
        typer.echo("demo: not wired yet")
