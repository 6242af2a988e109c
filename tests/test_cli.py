"""The `ai-server` command line, run as a subprocess against a real server (real HTTP).

One server for the module, started by the command itself (`ai-server serve`, i.e. `bentoml serve`),
with API keys on so every command also sends its key. Pulls come from LocalHub (a local
Hugging-Face-compatible server); interactive sessions and progress bars run in a pseudo-terminal.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pexpect
import pytest

from tests.support.fixtures import TINY_GPT2, TINY_LLAMA
from tests.support.hub_server import LocalHub
from tests.support.server_process import ROOT, free_port, start_server, stop_server, wait_healthy
from tests.support.tiny_models import install_into_hf_cache

KEY = "cli-test-key"
COPY = "test-org/tiny-llama-alias"
SLOW = "test-org/slow-llama"
SHORT = ("--parameter", "num_predict=4")  # a short answer where only the prompt matters


@dataclass
class Server:
    url: str
    hub: LocalHub
    http: httpx.Client


def cli_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "AI_SERVER_HOST", "AI_SERVER_API_KEY")}
    return {**env, "AI_SERVER_HOST": url, "AI_SERVER_API_KEY": KEY, "COLUMNS": "200", **extra}


def cli(server: Server, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """`ai-server ARGS` with piped stdin and captured output."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        env=cli_env(server.url, **env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
    )


def spawn(server: Server, *args: str) -> pexpect.spawn:
    """`ai-server ARGS` in a pseudo-terminal, as a person runs it."""
    return pexpect.spawn(
        sys.executable,
        ["-m", "cli", *args],
        cwd=str(ROOT),
        env=cli_env(server.url),
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("cli")
    install_into_hf_cache(tiny_llama_dir, root / "hf" / "hub", TINY_LLAMA)  # pulled already
    port, log = free_port(), root / "server.log"
    with LocalHub(root / "hub") as hub:
        hub.add_repo(TINY_GPT2, tiny_gpt2_dir)
        hub.add_repo(SLOW, tiny_llama_dir)
        env = {
            "HF_HOME": str(root / "hf"),
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "DATA_DIR": str(root / "data"),
            "BENTOML_HOME": str(root / "bentoml"),
            "BACKEND": "transformers",
            "API_KEYS": KEY,
        }
        proc = start_server(env, port, log, command=[sys.executable, "-m", "cli", "serve"])
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc, log)
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
                yield Server(url, hub, http)
        finally:
            stop_server(proc)


# -- serve ------------------------------------------------------------------------------------------
def test_serve_started_the_server_and_refuses_invalid_settings(server: Server) -> None:
    assert server.http.get("/api/version").status_code == 200  # the module's server came from `ai-server serve`
    bad = cli(server, "serve", "--port", str(free_port()), MAX_CACHE_MODELS="0")
    assert bad.returncode == 1
    assert "MAX_CACHE_MODELS" in bad.stderr and bad.stderr.startswith("Error: invalid configuration"), bad.stderr


# -- pull -------------------------------------------------------------------------------------------
def test_pull_shows_progress_and_finishes(server: Server) -> None:
    server.hub.throttle_bytes_per_sec = 500_000  # the 1.3 MB of weights take a few seconds: the bar moves
    try:
        child = spawn(server, "pull", TINY_GPT2)
        child.expect(f"pulling {TINY_GPT2}")
        child.expect(r"\d+(\.\d+)?/\d+(\.\d+)? [kM]B")  # bytes done / total
        child.expect(r"[kM]B/s")  # speed
        child.expect(f"success: '{TINY_GPT2}' is pulled")
        child.expect(pexpect.EOF)
        child.close()
    finally:
        server.hub.throttle_bytes_per_sec = None
    assert child.exitstatus == 0, child.before
    listed = cli(server, "list")
    assert f"{TINY_GPT2}:latest" in listed.stdout


def test_pull_with_load_reports_the_precision(server: Server) -> None:
    result = cli(server, "pull", TINY_GPT2, "--load", "--quantize", "fp16")
    assert result.returncode == 0, result.stderr
    assert f"success: '{TINY_GPT2}' is pulled and loaded (" in result.stdout


def test_a_failing_pull_exits_non_zero_with_the_jobs_error(server: Server) -> None:
    result = cli(server, "pull", "test-org/no-such-model")
    assert result.returncode == 1
    assert "Error: pulling 'test-org/no-such-model' failed:" in result.stderr
    assert "was not found on" in result.stderr  # the job's own error
    invalid = cli(server, "pull", "../escape")
    assert invalid.returncode == 1 and "invalid" in invalid.stderr.lower() and "HTTP 400" in invalid.stderr


def test_ctrl_c_stops_following_but_the_pull_goes_on(server: Server) -> None:
    server.hub.throttle_bytes_per_sec = 300_000  # about 4 s for the whole model
    try:
        child = spawn(server, "pull", SLOW)
        child.expect(r"\d+(\.\d+)?/\d+(\.\d+)? [kM]B")
        child.sendintr()
        child.expect(f"the pull goes on in the server .*`ai-server pull {SLOW}`")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 130
        [job] = [j for j in server.http.get("/jobs").json()["jobs"] if j["model"] == SLOW]
        assert job["status"] == "running"
        again = cli(server, "pull", SLOW)  # joins the running job and follows it to the end
    finally:
        server.hub.throttle_bytes_per_sec = None
    assert again.returncode == 0, again.stderr
    assert [j["id"] for j in server.http.get("/jobs").json()["jobs"] if j["model"] == SLOW] == [job["id"]]


def test_jobs_lists_pulls_with_status_and_errors(server: Server) -> None:
    cli(server, "pull", "test-org/missing-for-jobs")
    result = cli(server, "jobs")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["ID", "MODEL", "STATUS", "PROGRESS", "CREATED", "ERROR"]
    failed = next(r for r in rows if "test-org/missing-for-jobs" in r)
    assert " failed " in failed and "was not found on" in failed


# -- run --------------------------------------------------------------------------------------------
def test_run_answers_a_prompt_and_reports_timings(server: Server) -> None:
    result = cli(server, "run", TINY_LLAMA, "say", "hello", "--verbose", "--parameter", "num_predict=5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert 0 < int(re.search(r"(?<!prompt )eval count:\s+(\d+)", result.stderr).group(1)) <= 5
    bad = cli(server, "run", TINY_LLAMA, "hi", "--parameter", "temperature=hot")
    assert bad.returncode == 1 and "'hot' is not a number for 'temperature'" in bad.stderr


def test_run_reads_the_prompt_from_stdin(server: Server) -> None:
    result = cli(server, "run", TINY_LLAMA, "--verbose", *SHORT, stdin="a question from a pipe\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    longer = cli(server, "run", TINY_LLAMA, "and", "more", "--verbose", *SHORT, stdin="a question from a pipe\n")
    # Piped input and the words are sent together, as `ollama run` does: a longer prompt.
    assert prompt_tokens(longer.stderr) > prompt_tokens(result.stderr)


def prompt_tokens(text: str) -> int:
    return int(re.findall(r"prompt eval count:\s+(\d+)", text)[-1])


def test_interactive_chat_keeps_history_and_obeys_commands(server: Server) -> None:
    child = spawn(server, "run", TINY_LLAMA, "--verbose")

    def say(line: str) -> None:
        child.expect_exact(">>> ")
        child.sendline(line)

    def answered() -> tuple[int, int]:
        child.expect(r"prompt eval count:\s+(\d+)")
        prompt = int(child.match.group(1))
        child.expect(r"(?<!prompt )eval count:\s+(\d+)")
        return prompt, int(child.match.group(1))

    say("/set parameter num_predict 6")
    child.expect_exact("Set parameter 'num_predict' to '6'")
    say("/set parameter temperature 0")
    child.expect_exact("Set parameter 'temperature' to '0'")
    say("/set parameter temperature warm")
    child.expect_exact("'warm' is not a number")
    say("hello")
    first, generated = answered()
    assert 0 < generated <= 6  # num_predict reached the server
    say('"""a message')
    child.expect_exact("... ")  # still the same message
    child.sendline('on two lines"""')
    second, _ = answered()
    assert second > first + 4  # the first exchange was sent again as history
    say("/clear")
    child.expect_exact("Cleared session context")
    say("hello")
    assert answered()[0] == first
    say("/set system Answer briefly and politely.")
    child.expect_exact("Set system message.")
    say("hello")
    assert answered()[0] > first
    child.expect_exact(">>> ")
    child.sendintr()  # Ctrl-C at the prompt does not leave
    child.expect_exact("Use Ctrl + d or /bye to exit.")
    say("/set parameter warmth 1")
    child.expect_exact("unknown parameter 'warmth'")
    say("/nonsense")
    child.expect_exact("Unknown command '/nonsense'")
    say("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_run_on_a_model_that_is_not_pulled_says_how_to_pull_it(server: Server) -> None:
    for args in (("run", "test-org/not-here", "hi"), ("show", "test-org/not-here"), ("rm", "test-org/not-here")):
        result = cli(server, *args)
        assert result.returncode == 1
        assert (
            "model 'test-org/not-here' is not pulled. Pull it first with: ai-server pull test-org/not-here"
            in result.stderr
        ), result.stderr
    child = spawn(server, "run", "test-org/not-here")  # interactive: said before the first prompt
    child.expect_exact("ai-server pull test-org/not-here")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1


# -- list, ps, show, cp, rm ---------------------------------------------------------------------------
def test_list_shows_pulled_models_with_size_precision_and_load_state(server: Server) -> None:
    assert cli(server, "run", TINY_LLAMA, "hi", *SHORT).returncode == 0  # loaded now
    result = cli(server, "list")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "PRECISION", "LOADED", "MODIFIED"]
    tag = next(m for m in server.http.get("/api/tags").json()["models"] if m["model"] == f"{TINY_LLAMA}:latest")
    row = next(r for r in rows if r.startswith(f"{TINY_LLAMA}:latest "))
    assert tag["digest"][:12] in row
    from rich.filesize import decimal

    assert decimal(tag["size"]) in row
    assert "transformers, fp32" in row and "ago" in row


def test_ps_shows_loaded_models_and_their_expiry(server: Server) -> None:
    assert cli(server, "run", TINY_LLAMA, "hi", "--keepalive", "10m", *SHORT).returncode == 0
    result = cli(server, "ps")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "PRECISION", "BACKEND", "PROCESSOR", "CONTEXT", "UNTIL"]
    row = next(r for r in rows if r.startswith(f"{TINY_LLAMA}:latest "))
    assert "FP32" in row and "transformers" in row and "100% CPU" in row and " 512 " in row
    assert re.search(r"(9|10) minutes from now", row), row


def test_show_prints_the_model_sections(server: Server) -> None:
    result = cli(server, "show", TINY_LLAMA)
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["Model"] in lines and ["Capabilities"] in lines and ["completion"] in lines
    assert ["architecture", "llama"] in lines and ["context", "length", "512"] in lines
    template = cli(server, "show", TINY_LLAMA, "--template")
    assert "{%" in template.stdout  # the Jinja chat template itself


def test_cp_then_rm(server: Server) -> None:
    copied = cli(server, "cp", TINY_LLAMA, COPY)
    assert copied.returncode == 0 and f"copied '{TINY_LLAMA}' to '{COPY}'" in copied.stdout
    assert f"{COPY}:latest" in cli(server, "list").stdout
    removed = cli(server, "rm", COPY)
    assert removed.returncode == 0 and f"deleted '{COPY}'" in removed.stdout
    assert f"{COPY}:latest" not in cli(server, "list").stdout
    assert f"{TINY_LLAMA}:latest" in cli(server, "list").stdout  # the source stays


# -- errors as sentences ------------------------------------------------------------------------------
def test_no_server_says_how_to_start_one(server: Server) -> None:
    for host_env in (
        {"AI_SERVER_HOST": f"127.0.0.1:{free_port()}"},
        {"AI_SERVER_HOST": "", "OLLAMA_HOST": f"127.0.0.1:{free_port()}"},
    ):
        result = cli(server, "list", **host_env)
        assert result.returncode == 1
        assert result.stderr.startswith("Error: could not connect to ai-server at http://127.0.0.1:"), result.stderr
        assert "Start it with `ai-server serve`" in result.stderr


def test_a_missing_api_key_is_explained(server: Server) -> None:
    result = cli(server, "list", AI_SERVER_API_KEY="")
    assert result.returncode == 1
    assert "the server needs an API key: pass --api-key KEY or set AI_SERVER_API_KEY" in result.stderr
    assert cli(server, "list", "--api-key", KEY, AI_SERVER_API_KEY="").returncode == 0


def test_thinking_is_printed_dimmed_before_the_answer() -> None:
    """The renderer alone: the server's `/api/chat` does not send `message.thinking` in this branch."""
    from cli.chat import AnswerPrinter
    from cli.render import out

    printer = AnswerPrinter()
    with out.capture() as captured:
        for message in ({"thinking": "let me see"}, {"thinking": "..."}, {"content": "Yes."}):
            printer.piece(message)
    assert captured.get() == "Thinking...\nlet me see...\n...done thinking.\n\nYes."
    assert "".join(printer.content) == "Yes."
    unfinished = AnswerPrinter()  # an answer that ended while still thinking closes the block
    with out.capture() as captured:
        unfinished.piece({"thinking": "hmm"})
        unfinished.finish()
    assert captured.get() == "Thinking...\nhmm\n...done thinking.\n"


def test_pip_install_puts_an_ai_server_command_on_the_path(tmp_path: Path) -> None:
    """Build the project's wheel (from a copy, so the worktree gets no build folders) and install it."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".*", "tests", "bench", "docs", "build", "data", "*.egg-info", "__pycache__"),
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # Without build isolation where setuptools is at hand: no index lookup for the build backend.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", *isolation, "-w", str(tmp_path / "wheel"), str(src)], check=True, timeout=300
    )
    [wheel] = (tmp_path / "wheel").glob("ai_server-*.whl")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True, timeout=120
    )
    command = tmp_path / "site" / "bin" / "ai-server"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "AI_SERVER_HOST": f"127.0.0.1:{free_port()}"}
    result = subprocess.run([str(command), "list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Start it with `ai-server serve`" in result.stderr, result.stderr
    installed = subprocess.run(
        [str(command), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    commands = ("serve", "pull", "run", "list", "ps", "show", "rm", "cp", "jobs")
    assert all(name in installed.stdout for name in commands), installed.stdout
