"""The `ai-server` command: one typer app, one function per subcommand."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from cli import chat
from cli import pull as pulling
from cli.client import CliError, Server
from cli.render import ago, err, out, section, short_digest, size, table

app = typer.Typer(
    name="ai-server",
    help="Serve Hugging Face models with ai-server, and pull, chat with and manage them from the terminal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

HostOption = Annotated[
    str | None,
    typer.Option(
        "--host",
        envvar=["AI_SERVER_HOST", "OLLAMA_HOST"],
        show_envvar=True,
        help="The server: a URL or host[:port] (default http://localhost:8005).",
    ),
]
KeyOption = Annotated[
    str | None,
    typer.Option("--api-key", envvar="AI_SERVER_API_KEY", show_envvar=True, help="A key from the server's API_KEYS."),
]


class Quantize(str, Enum):
    """`POST /pull`'s `quantize`: the precision the model loads in."""

    auto = "auto"
    q4 = "q4"
    fp16 = "fp16"
    no = "no"


# -- the server ------------------------------------------------------------------------------------


@app.command()
def serve(
    port: Annotated[int, typer.Option("--port", "-p", envvar="PORT", show_envvar=True)] = 8005,
    host: Annotated[
        str | None, typer.Option("--host", help="The address to listen on (default: every interface).")
    ] = None,
) -> None:
    """Start the server, as `make serve` does; settings come from the environment (see README)."""
    from cli.serve import serve as start

    start(host, port)


# -- models ------------------------------------------------------------------------------------------


@app.command()
def pull(
    model: str,
    quantize: Annotated[Quantize, typer.Option(help="The precision the model loads in.")] = Quantize.auto,
    load: Annotated[bool, typer.Option("--load", help="Load the model once it is downloaded.")] = False,
    host: HostOption = None,
    api_key: KeyOption = None,
) -> None:
    """Download a model from the Hugging Face Hub, following the pull job with a progress bar."""
    pulling.pull(Server(host, api_key), model, quantize.value, load)


@app.command()
def run(
    model: str,
    prompt: Annotated[list[str] | None, typer.Argument(help="Answer this and exit; without it, chat.")] = None,
    think: Annotated[bool, typer.Option("--think", help="Ask the model to think first (shown dimmed).")] = False,
    keepalive: Annotated[str | None, typer.Option(help="How long the model stays loaded: 5m, 1h, 0.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Print timings after each answer.")] = False,
    parameter: Annotated[
        list[str] | None,
        typer.Option(
            "--parameter",
            metavar="NAME=VALUE",
            help="A sampling option, as `/set parameter` sets it (temperature=0, num_predict=64); repeatable.",
        ),
    ] = None,
    host: HostOption = None,
    api_key: KeyOption = None,
) -> None:
    """Chat with a pulled model: one answer to PROMPT (or to piped input), or an interactive session."""
    session = chat.ChatSession(model=model, think=think, keep_alive=keepalive, verbose=verbose)
    for item in parameter or []:
        name, _, value = item.partition("=")
        session.set_option(name.strip(), value.strip())
    server = Server(host, api_key)
    piped = chat.read_stdin()
    words = " ".join(prompt or [])
    if piped is None and not words:
        chat.interactive(server, session)
        return
    text = " ".join(part for part in (piped, words) if part and part.strip())
    if not text.strip():
        raise CliError("nothing to send: give a prompt, pipe one in, or run without input to chat")
    try:
        chat.run_once(server, session, text)
    except KeyboardInterrupt:
        out.print()
        raise typer.Exit(130) from None


@app.command("list")
def list_models(
    host: HostOption = None,
    api_key: KeyOption = None,
) -> None:
    """The pulled models: name, id, size, precision, whether loaded (and where), last modified."""
    server = Server(host, api_key)
    tags = server.get("/api/tags")["models"]
    loaded = {m["model"]: m for m in server.get("/models")["models"] if m.get("loaded")}
    rows = []
    for m in tags:
        native = loaded.get(_untagged(m["name"]))
        state = f"{native['backend']}, {native['quantization']}" if native else "-"
        rows.append(
            (
                m["name"],
                short_digest(m.get("digest")),
                size(m.get("size")),
                m["details"].get("quantization_level", "-"),
                state,
                ago(m.get("modified_at")),
            )
        )
    out.print(table(("NAME", "ID", "SIZE", "PRECISION", "LOADED", "MODIFIED"), rows))


@app.command()
def ps(
    host: HostOption = None,
    api_key: KeyOption = None,
) -> None:
    """The loaded models: memory, precision, backend, processor, context and when they unload."""
    server = Server(host, api_key)
    running = server.get("/api/ps")["models"]
    backends = {m["model"]: m["backend"] for m in server.get("/status").get("loaded_models", [])}
    rows = []
    for m in running:
        processor = "100% GPU" if m.get("size_vram") else "100% CPU"
        rows.append(
            (
                m["name"],
                short_digest(m.get("digest")),
                size(m.get("size")),
                m["details"].get("quantization_level", "-"),
                backends.get(_untagged(m["name"]), "-"),
                processor,
                str(m.get("context_length") or "-"),
                ago(m.get("expires_at")),
            )
        )
    out.print(table(("NAME", "ID", "SIZE", "PRECISION", "BACKEND", "PROCESSOR", "CONTEXT", "UNTIL"), rows))


@app.command()
def show(
    model: str,
    template: Annotated[bool, typer.Option("--template", help="Print the chat template only.")] = False,
    host: HostOption = None,
    api_key: KeyOption = None,
) -> None:
    """A model's architecture, size, context, precision, capabilities and default parameters."""
    info = Server(host, api_key).post("/api/show", {"model": model}, model=model)
    if template:
        out.print(info.get("template") or "(this model has no chat template)", markup=False)
        return
    details, model_info = info.get("details", {}), info.get("model_info", {})
    arch = model_info.get("general.architecture") or details.get("family", "-")
    rows = [
        ("architecture", arch),
        ("parameters", details.get("parameter_size") or "-"),
        ("context length", model_info.get(f"{arch}.context_length")),
        ("embedding length", model_info.get(f"{arch}.embedding_length")),
        ("precision", details.get("quantization_level")),
        ("format", details.get("format")),
    ]
    section("Model", [(k, str(v)) for k, v in rows if v is not None])
    section("Capabilities", [(c, "") for c in info.get("capabilities", [])])
    parameters = [line.split(maxsplit=1) for line in (info.get("parameters") or "").splitlines() if line.strip()]
    section("Parameters", [(p[0], p[1] if len(p) > 1 else "") for p in parameters])


@app.command()
def rm(
    models: Annotated[list[str], typer.Argument(help="One or more models.")],
    host: HostOption = None,
    api_key: KeyOption = None,
) -> None:
    """Unload models and remove them from the Hugging Face cache."""
    server = Server(host, api_key)
    for model in models:
        server.delete("/api/delete", {"model": model}, model=model)
        out.print(f"deleted '{model}'")


@app.command()
def cp(source: str, destination: str, host: HostOption = None, api_key: KeyOption = None) -> None:
    """Give a model a second name (no weights are copied)."""
    Server(host, api_key).post("/api/copy", {"source": source, "destination": destination}, model=source)
    out.print(f"copied '{source}' to '{destination}'")


@app.command()
def jobs(
    host: HostOption = None,
    api_key: KeyOption = None,
) -> None:
    """Pull jobs, newest first: status, progress and errors."""
    rows = []
    for job in Server(host, api_key).get("/jobs")["jobs"]:
        total, done = job.get("total_bytes"), job.get("completed_bytes") or 0
        progress = f"{size(done)} / {size(total)}" if total else "-"
        if total and job["status"] in ("running", "queued"):
            progress += f" ({100 * done // total}%)"
        rows.append(
            (
                job["id"][:8],
                job["model"],
                job["status"],
                progress,
                ago(job.get("created_at")),
                job.get("load_error") or job.get("error") or "",
            )
        )
    out.print(table(("ID", "MODEL", "STATUS", "PROGRESS", "CREATED", "ERROR"), rows))


def _untagged(name: str) -> str:
    """`org/model:latest` → `org/model`, the name /models and /status use for the default revision."""
    return name.removesuffix(":latest")


def main() -> None:
    """The console script: run the app, printing a CliError as one sentence and exiting with its code."""
    try:
        app()
    except CliError as exc:
        err.print(f"Error: {exc.message}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(exc.exit_code) from None
