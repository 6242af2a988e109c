"""The benchmark's outputs: a markdown table with the targets' ratios, and the JSON behind it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_COLUMNS = ("ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms", "tokens_per_second", "requests_per_second")


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, measured at the reference concurrency (8, or the largest level run)."""
    rows = results["rows"]
    c = results["config"]["reference_concurrency"]

    def find(backend: str, kind: str, concurrency: int, dialect: str | None = None) -> dict | None:
        return next((r for r in rows if r["backend"] == backend and r["kind"] == kind
                     and r["concurrency"] == concurrency and (dialect is None or r["dialect"] == dialect)), None)

    checks = []
    for backend, floor in (("transformers", 0.8), ("vllm", 0.9)):
        http, inproc = find(backend, "http", c, "openai"), find(backend, "in-process", c)
        if http and inproc:
            ratio = http["tokens_per_second"] / inproc["tokens_per_second"]
            checks.append({"target": f"{backend}: {c} streams over HTTP ≥ {floor}× in-process tok/s",
                           "measured": f"{ratio:.2f}×", "met": ratio >= floor})
        single, first = find(backend, "http", 1, "openai"), find(backend, "in-process", 1)
        if single and first:
            overhead = single["ttft_p50_ms"] - first["ttft_p50_ms"]
            checks.append({"target": f"{backend}: HTTP adds ≤ 10 ms to median TTFT",
                           "measured": f"{overhead:+.1f} ms", "met": overhead <= 10})
    http, serial = find("transformers", "http", c, "openai"), find("transformers", "one-at-a-time", c, "openai")
    if http and serial:
        ratio = http["tokens_per_second"] / serial["tokens_per_second"]
        checks.append({"target": f"transformers: {c} streams ≥ 4× one-at-a-time serving",
                       "measured": f"{ratio:.1f}×", "met": ratio >= 4})
    return checks


def markdown(results: dict[str, Any]) -> str:
    config, machine = results["config"], results["machine"]
    lines = [
        f"Model: random-weight Llama, {config['parameters'] / 1e6:.1f}M parameters; prompt {config['prompt_tokens']}"
        f" tokens, {config['max_tokens']} output tokens per request; {config['repeats']} repeats (medians).",
        f"Machine: {machine['description']}.",
        "",
        "| backend | measured | dialect | concurrency | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms "
        "| tok/s | req/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        cells = [f"{row[k]:.1f}" if row.get(k) is not None else "" for k in _COLUMNS]
        lines.append(f"| {row['backend']} | {row['kind']} | {row['dialect'] or ''} | {row['concurrency']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'no'} |" for t in results["targets"]]
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
