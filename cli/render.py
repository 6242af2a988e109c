"""How the commands print: Ollama-like plain tables, sizes in decimal units, times relative to now."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

# Piped into another program, tables keep whole names on one line instead of folding them at 80 columns.
_PIPED_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 250
out = Console(highlight=False, width=_PIPED_WIDTH)
err = Console(stderr=True, highlight=False)

FOREVER_YEAR = 2318  # the year Ollama (and this server's /api/ps) reports for "never expires"


def size(n: int | None) -> str:
    """`1.3 GB`, `523.0 kB`: decimal units, as `ollama list` prints them."""
    return "-" if n is None else decimal(n)


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def ago(text: str | None, now: datetime | None = None) -> str:
    """`3 minutes ago`, `2 hours from now`: an ISO time relative to now, in words."""
    when = parse_time(text)
    if when is None:
        return "-"
    if when.year >= FOREVER_YEAR:
        return "Forever"
    delta = (when - (now or datetime.now(timezone.utc))).total_seconds()
    seconds = abs(delta)
    if seconds < 1:
        return "Now"
    for unit, length in (
        ("year", 365 * 86400),
        ("month", 30 * 86400),
        ("week", 7 * 86400),
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
        ("second", 1),
    ):
        if seconds >= length:
            count = int(seconds // length)
            words = f"{count} {unit}{'s' if count != 1 else ''}"
            return f"{words} from now" if delta > 0 else f"{words} ago"
    return "Now"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    """Upper-case headers, columns separated by spaces, no borders: the look of `ollama list`."""
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for header in headers:
        grid.add_column(header, overflow="fold")
    for row in rows:
        grid.add_row(*row)
    return grid


def section(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A titled block of indented `key    value` lines, as `ollama show` prints them (skipped when empty)."""
    if not rows:
        return
    grid = Table.grid(padding=(0, 4))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for key, value in rows:
        grid.add_row(f"    {key}", value)
    out.print(f"  {title}")
    out.print(grid)
    out.print()


def short_digest(digest: str | None) -> str:
    return (digest or "")[:12] or "-"
