"""Configuration from the environment: defaults, parsing, and clear errors for bad values."""

from __future__ import annotations

import pytest

from settings import Settings, SettingsError, load_settings, parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("250ms", 0.25),
        ("30s", 30),
        ("45", 45),
        (0, 0),
        (2.5, 2.5),
        ("-1", None),
        (-5, None),
        ("-1m", None),
    ],
)
def test_keep_alive_durations(value: object, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5x", "m5", ""])
def test_bad_durations_are_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_defaults_match_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "MAX_CACHE_MODELS",
        "MODEL_LOAD_COOLDOWN",
        "MODEL_Q4_THRESHOLD_BYTES",
        "MAX_CONCURRENT_PULLS",
        "BACKEND",
        "KEEP_ALIVE",
        "API_KEYS",
        "DATABASE_URL",
        "MODEL_MEMORY_BUDGET_BYTES",
    ):
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert (s.max_cache_models, s.model_load_cooldown, s.model_q4_threshold_bytes, s.max_concurrent_pulls) == (
        2,
        300,
        14_000_000_000,
        2,
    )
    assert s.backend == "auto" and s.keep_alive == 300 and s.api_keys == [] and s.model_memory_budget_bytes is None
    assert s.resolved_database_url == f"sqlite:///{s.data_dir / 'jobs.db'}"


def test_environment_values_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_Q4_THRESHOLD_BYTES", "3e9")
    monkeypatch.setenv("TRUST_REMOTE_CODE_MODELS", "org/a, org/b")
    monkeypatch.setenv("KEEP_ALIVE", "-1")
    monkeypatch.setenv("DATABASE_URL", "postgresql://db/jobs")
    s = load_settings()
    assert s.model_q4_threshold_bytes == 3_000_000_000
    assert s.trust_remote_code_models == ["org/a", "org/b"]
    assert s.keep_alive is None  # negative: keep loaded forever
    assert s.resolved_database_url == "postgresql://db/jobs"


def test_invalid_values_name_each_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKEND", "tensorrt")
    monkeypatch.setenv("MAX_CACHE_MODELS", "0")
    monkeypatch.setenv("KEEP_ALIVE", "later")
    with pytest.raises(SettingsError) as err:
        load_settings()
    message = str(err.value)
    assert "BACKEND" in message and "MAX_CACHE_MODELS" in message and "KEEP_ALIVE" in message
