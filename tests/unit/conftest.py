"""The fast unit layer: pure functions and the pool's policy, with no server and no model weights.

Every test here is marked `unit` (run them alone with `pytest tests/unit` or `pytest -m unit`);
they are part of the normal `pytest` run too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.unit)
