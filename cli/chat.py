"""`ai-server run`: one answer to a prompt, or an interactive chat, streamed from `/api/chat` (NDJSON).

The interactive session follows `ollama run`: `>>> ` prompts, `\"\"\"` opens and closes multi-line
input, `/bye` ends, `/clear` forgets the conversation, `/set parameter NAME VALUE` and `/set system`
change the request; Ctrl-C stops an answer, Ctrl-D (or /bye) leaves.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cli.client import CliError, Server
from cli.render import err, out

MULTILINE = '"""'
PROMPT, CONTINUATION = ">>> ", "... "
# The sampling options the server reads (Ollama's names). Whole numbers for these; floats for the
# others; `stop` is a list.
INT_OPTIONS = frozenset({"top_k", "num_predict", "seed", "repeat_last_n", "num_ctx"})
FLOAT_OPTIONS = frozenset({"temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"})
HELP = """Available commands:
  /set parameter NAME VALUE   set a sampling option (temperature, top_p, top_k, num_predict, seed, stop, ...)
  /set system TEXT            set the system message
  /set think, /set nothink    ask the model to think before answering, or not
  /clear                      forget the conversation so far
  /bye                        leave
  /?, /help                   this help

Use \"\"\" to begin and end a multi-line message."""


@dataclass
class ChatSession:
    """What the next request carries: the conversation, the sampling options, the system message."""

    model: str
    options: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    think: bool = False
    keep_alive: str | None = None
    verbose: bool = False
    history: list[dict[str, str]] = field(default_factory=list)

    def set_option(self, name: str, value: str) -> None:
        """Set a sampling option from its text; CliError when the value is not one the option takes."""
        if not name or not value:
            raise CliError("a parameter needs a name and a value (temperature 0.5)")
        if name not in INT_OPTIONS | FLOAT_OPTIONS | {"stop"}:
            known = ", ".join(sorted(INT_OPTIONS | FLOAT_OPTIONS | {"stop"}))
            raise CliError(f"unknown parameter '{name}' (known: {known})")
        if name == "stop":  # each stop sequence adds to the list
            self.options["stop"] = [*self.options.get("stop", []), value]
            return
        try:
            self.options[name] = int(value) if name in INT_OPTIONS else float(value)
        except ValueError:
            raise CliError(f"'{value}' is not a number for '{name}'") from None

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {"model": self.model, "messages": [*system, *messages], "stream": True}
        if self.options:
            body["options"] = self.options
        if self.think:  # sent only when asked: servers and models that cannot think refuse it
            body["think"] = True
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body


class AnswerPrinter:
    """Prints streamed pieces as they arrive; thinking dimmed between `Thinking...` and `...done thinking.`"""

    def __init__(self) -> None:
        self.thinking = False
        self.content: list[str] = []

    def piece(self, message: dict[str, Any]) -> None:
        if thought := message.get("thinking"):
            if not self.thinking:
                out.print("Thinking...", style="dim")
                self.thinking = True
            out.print(thought, style="dim", end="", markup=False, soft_wrap=True)
        if text := message.get("content"):
            if self.thinking:
                out.print("\n...done thinking.\n", style="dim")
                self.thinking = False
            out.print(text, end="", markup=False, soft_wrap=True)
            self.content.append(text)

    def finish(self) -> None:
        """Close a thinking block the answer never left (a stream that ended while thinking)."""
        if self.thinking:
            out.print("\n...done thinking.", style="dim")
            self.thinking = False


def answer(server: Server, session: ChatSession, messages: list[dict[str, str]]) -> str:
    """Stream one answer to the terminal; returns its text."""
    printer, final = AnswerPrinter(), {}
    with server.stream_lines("/api/chat", session.body(messages), model=session.model) as lines:
        for line in lines:
            printer.piece(line.get("message") or {})
            if line.get("done"):
                final = line
    printer.finish()
    if session.verbose:
        print_stats(final)
    return "".join(printer.content)


def print_stats(final: dict[str, Any]) -> None:
    """`--verbose`: the final answer's timings, as `ollama run --verbose` shows them."""

    def seconds(key: str) -> float:
        return (final.get(key) or 0) / 1e9

    rate = final.get("eval_count", 0) / seconds("eval_duration") if seconds("eval_duration") else 0.0
    err.print(
        f"\ntotal duration:       {seconds('total_duration'):.3f}s\n"
        f"load duration:        {seconds('load_duration'):.3f}s\n"
        f"prompt eval count:    {final.get('prompt_eval_count', 0)} token(s)\n"
        f"eval count:           {final.get('eval_count', 0)} token(s)\n"
        f"eval rate:            {rate:.2f} tokens/s",
        style="dim",
    )


def run_once(server: Server, session: ChatSession, prompt: str) -> None:
    answer(server, session, [{"role": "user", "content": prompt}])
    out.print()


# -- the interactive session ------------------------------------------------------------------------


def interactive(server: Server, session: ChatSession) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input(), where the platform has it
    with err.status(f"loading {session.model}"):  # an empty chat loads the model, as `ollama run` does
        server.post("/api/chat", {"model": session.model, "messages": []}, model=session.model)
    while True:
        try:
            text = read_message(input)
        except KeyboardInterrupt:
            out.print("\nUse Ctrl + d or /bye to exit.")
            continue
        except EOFError:
            out.print()
            return
        if text is None or not text.strip():
            continue
        if text.lstrip().startswith("/"):
            if command(session, text.strip()) == "bye":
                return
            continue
        message = {"role": "user", "content": text}
        try:
            reply = answer(server, session, [*session.history, message])
        except KeyboardInterrupt:  # stop this answer, keep the session; the stream closes on the way out
            out.print()
            continue
        session.history += [message, {"role": "assistant", "content": reply}]
        out.print("\n")


def read_message(read_line: Callable[[str], str]) -> str | None:
    """One message: a line, or the lines between an opening and a closing \"\"\" (markers removed)."""
    lines = [read_line(PROMPT)]
    while sum(line.count(MULTILINE) for line in lines) % 2:
        lines.append(read_line(CONTINUATION))
    return "\n".join(lines).replace(MULTILINE, "")


def command(session: ChatSession, text: str) -> str | None:
    """Run a slash command; returns "bye" when the session should end."""
    words = text.split(maxsplit=2)
    name = words[0]
    if name in ("/bye", "/exit"):
        return "bye"
    if name in ("/?", "/help"):
        out.print(HELP, markup=False)
    elif name == "/clear":
        session.history.clear()
        out.print("Cleared session context")
    elif name == "/set" and len(words) >= 2:
        _set(session, words[1], words[2] if len(words) > 2 else "")
    else:
        out.print(f"Unknown command '{text}'. Type /? for help", markup=False)
    return None


def _set(session: ChatSession, what: str, rest: str) -> None:
    if what == "system":
        session.system = rest.strip() or None
        out.print("Set system message." if session.system else "Cleared system message.")
    elif what in ("think", "nothink"):
        session.think = what == "think"
        out.print(f"Set '{what}' mode.")
    elif what == "parameter":
        name, _, value = rest.partition(" ")
        try:
            session.set_option(name, value.strip())
        except CliError as exc:
            out.print(f"Couldn't set parameter: {exc.message}", markup=False)
            return
        out.print(f"Set parameter '{name}' to '{value.strip()}'", markup=False)
    else:
        out.print(f"Unknown /set option '{what}'. Type /? for help", markup=False)


def read_stdin() -> str | None:
    """Piped input (`echo hi | ai-server run MODEL`), or None when stdin is a terminal."""
    return None if sys.stdin.isatty() else sys.stdin.read()
