"""`ai-server serve`: the command `make serve` runs (`bentoml serve service:AIServer --port $PORT`)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from cli.client import CliError


def serve_command(host: str | None, port: int) -> list[str]:
    """`bentoml serve` for the installed service, from the folder that holds `service.py`, so it starts
    from any working directory (and never picks up another project's `service.py` there)."""
    spec = importlib.util.find_spec("service")
    if spec is None or spec.origin is None:
        raise CliError("the ai-server service is not installed here: run `pip install .` in the project first")
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service:AIServer",
        "--port",
        str(port),
        "--working-dir",
        str(Path(spec.origin).parent),
    ]
    return [*command, "--host", host] if host else command


def serve(host: str | None, port: int) -> None:
    """Check the settings as the server will read them, then become the server process (Ctrl-C and
    signals reach BentoML directly)."""
    from settings import SettingsError, load_settings  # the server's own settings: fail here, in words

    try:
        load_settings()
    except SettingsError as exc:
        raise CliError(str(exc)) from None
    command = serve_command(host, port)
    os.execv(command[0], command)
