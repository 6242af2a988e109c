"""The benchmark end to end at its smallest size: a smoke check of its outputs, not of speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_prints_the_table_and_writes_json_and_png(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--backends", "transformers", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| backend | measured | dialect | concurrency | TTFT p50 ms |" in done.stdout

    [saved] = tmp_path.glob("bench-*.json")
    results = json.loads(saved.read_text())
    measured = {(r["backend"], r["kind"], r["dialect"], r["concurrency"]) for r in results["rows"]}
    assert measured == {
        ("transformers", "in-process", None, 1),
        ("transformers", "in-process", None, 2),
        ("transformers", "runner", None, 1),
        ("transformers", "runner", None, 2),
        ("transformers", "http", "openai", 1),
        ("transformers", "http", "openai", 2),
        ("transformers", "http", "ollama", 1),
        ("transformers", "http", "ollama", 2),
        ("transformers", "http", "openai-json", 1),
        ("transformers", "http", "openai-json", 2),
        ("transformers", "one-at-a-time", "openai", 2),
    }
    assert all(r["tokens_per_second"] > 0 and r["ttft_p50_ms"] > 0 for r in results["rows"])
    http = [r for r in results["rows"] if r["kind"] in ("http", "one-at-a-time")]
    assert all(r["ttft_p95_ms"] >= r["ttft_p50_ms"] and r["itl_p95_ms"] >= r["itl_p50_ms"] for r in http)
    assert all(0 < r["client_cpu_cores"] <= 2 for r in http)
    [single] = [t for t in results["single_stream_ttft"] if t["dialect"] == "openai"]
    assert single["samples"] == 3 and 0 < single["server_mean_ms"] <= single["http_mean_ms"]
    assert {t["target"].split(":")[0] for t in results["targets"]} == {"transformers"}
    assert "| target | measured | met |" in done.stdout and "server-side mean ms" in done.stdout
    [memory] = results["memory"]  # the model's precision and size as the server reports them, and its RSS
    assert memory["backend"] == "transformers" and memory["quantization"] in ("bf16", "fp32")
    assert 0 < memory["model_bytes"] < memory["server_rss_bytes"]
    assert "| backend | loaded as | model MiB | server processes RSS MiB |" in done.stdout
    [plot] = tmp_path.glob("bench-*.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
