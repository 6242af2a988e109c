"""A PNG of tokens/s and TTFT against concurrency, drawn from the benchmark's JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def render(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, ttft) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list[dict]] = {}
    for row in results["rows"]:
        label = f"{row['backend']} {row['kind']}" + (f" ({row['dialect']})" if row["dialect"] else "")
        series.setdefault(label, []).append(row)
    for label, rows in series.items():
        rows.sort(key=lambda r: r["concurrency"])
        levels = [r["concurrency"] for r in rows]
        style = "-" if rows[0]["kind"] == "http" else "--"  # dashed: the baselines
        throughput.plot(levels, [r["tokens_per_second"] for r in rows], style, marker="o", label=label)
        ttft.plot(levels, [r["ttft_p50_ms"] for r in rows], style, marker="o", label=label)
    throughput.set(title="Output tokens/s", xlabel="concurrent streams", ylabel="tokens/s")
    ttft.set(title="Time to first token (p50)", xlabel="concurrent streams", ylabel="ms (log scale)", yscale="log")
    for axis in (throughput, ttft):
        axis.set_xticks(sorted({r["concurrency"] for r in results["rows"]}))
        axis.grid(alpha=0.3)
    throughput.legend(fontsize=7)
    fig.suptitle(results["machine"]["description"], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # redraw from a saved run: python -m bench.plot results.json out.png
    render(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
