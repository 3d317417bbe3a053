"""The model table: what a model can do, by family name, with the config's word over it."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from genai_prices import data_snapshot

from router.config import Config, ConfigError, from_mapping
from router.models import ModelInfo, clamp_temperature, model_info, temperature_rule

EMPTY = from_mapping({"providers": {}, "pools": {}, "routes": {}})


def config(models: dict[str, Any]) -> Config:
    return from_mapping({"providers": {}, "pools": {}, "routes": {}, "models": models})


# The models the old system named, and the current ones of each family.
KNOWN = [
    ("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("openai", "gpt-4"), ("openai", "gpt-3.5-turbo"),
    ("openai", "o1"), ("openai", "o3"), ("openai", "o3-mini"), ("openai", "o4-mini"),
    ("openai", "gpt-5"), ("openai", "gpt-5-mini"), ("openai", "gpt-5-nano"),
    ("anthropic", "claude-sonnet-4-5"), ("anthropic", "claude-haiku-4-5"),
    ("anthropic", "claude-3-5-sonnet-20241022"), ("anthropic", "claude-3-5-haiku-20241022"),
    ("gemini", "gemini-2.5-pro"), ("gemini", "gemini-2.5-flash"),
    ("gemini", "gemini-3-pro-preview"), ("gemini", "gemini-3-flash-preview"),
]


@pytest.mark.parametrize(("fmt", "model"), KNOWN)
def test_the_table_knows_the_usual_models(fmt: str, model: str) -> None:
    info = model_info(EMPTY, fmt, model)
    assert info.known
    assert info.context_window is not None and info.context_window >= 8_192
    assert info.max_output_tokens is not None and info.max_output_tokens <= info.context_window
    assert info.tools is True


def _prices_window(provider: str, model: str) -> int | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)[1].context_window


@pytest.mark.parametrize(("fmt", "provider", "model"), [
    ("openai", "openai", "gpt-4"), ("openai", "openai", "gpt-5"),
    ("anthropic", "anthropic", "claude-haiku-4-5"), ("gemini", "google", "gemini-2.5-flash"),
])
def test_context_windows_come_from_genai_prices_where_it_has_them(fmt: str, provider: str, model: str) -> None:
    window = _prices_window(provider, model)
    assert window is not None
    assert model_info(EMPTY, fmt, model).context_window == window


def test_the_table_fills_a_window_genai_prices_lacks() -> None:
    assert _prices_window("google", "gemini-2.5-pro") is None
    assert model_info(EMPTY, "gemini", "gemini-2.5-pro").context_window == 1_048_576


@pytest.mark.parametrize(("fmt", "model", "family"), [
    ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
    ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("openai", "gpt-4-0613", "gpt-4"),
    ("openai", "gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
    ("openai", "o3-mini-2025-01-31", "o3-mini"),
    ("anthropic", "claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("anthropic", "claude-3-5-haiku-latest", "claude-3-5-haiku"),
    ("gemini", "models/gemini-2.5-flash", "gemini-2.5-flash"),
    ("gemini", "gemini-2.5-flash-preview-05-20", "gemini-2.5-flash"),
    ("openai", "openai/gpt-4o-mini", "gpt-4o-mini"),
])
def test_dated_and_variant_names_find_their_family(fmt: str, model: str, family: str) -> None:
    info, base = model_info(EMPTY, fmt, model), model_info(EMPTY, fmt, family)
    assert info.known and info.name == model
    assert (info.max_output_tokens, info.vision, info.tools, info.temperature) == (
        base.max_output_tokens, base.vision, base.tools, base.temperature
    )


def test_a_prefix_that_is_not_at_a_dash_does_not_match() -> None:
    # gpt-4o is not a dated gpt-4; gpt-4 has no vision, gpt-4o has.
    assert model_info(EMPTY, "openai", "gpt-4").vision is False
    assert model_info(EMPTY, "openai", "gpt-4o").vision is True
    assert not model_info(EMPTY, "openai", "gpt-4x").known


@pytest.mark.parametrize(("fmt", "model", "vision"), [
    ("openai", "gpt-4o", True), ("openai", "gpt-4o-mini", True), ("openai", "gpt-3.5-turbo", False),
    ("openai", "o3-mini", False), ("anthropic", "claude-haiku-4-5", True), ("gemini", "gemini-2.5-flash", True),
    ("openai", "glm-4.6", False),
])
def test_vision(fmt: str, model: str, vision: bool) -> None:
    assert model_info(EMPTY, fmt, model).vision is vision


@pytest.mark.parametrize(("fmt", "model", "rule"), [
    ("openai", "gpt-4o", "any"),
    ("openai", "o1", "only_1"), ("openai", "o4-mini", "only_1"), ("openai", "gpt-5.1", "only_1"),
    ("anthropic", "claude-sonnet-4-5", "max_1"),
    # Anthropic's API caps every model, even one the table does not know.
    ("anthropic", "claude-next-7", "max_1"),
    ("gemini", "gemini-2.5-pro", "any"),
    ("openai", "some-local-model", "any"),
])
def test_temperature_rules(fmt: str, model: str, rule: str) -> None:
    assert model_info(EMPTY, fmt, model).temperature == rule
    assert temperature_rule(fmt, model) == rule


def test_an_unknown_model_is_used_as_the_config_says() -> None:
    assert model_info(EMPTY, "openai", "llama3") == ModelInfo(
        name="llama3", known=False, context_window=None, max_output_tokens=None, vision=None, tools=None,
        temperature="any",
    )


def test_a_model_only_the_config_describes_is_known() -> None:
    info = model_info(config({"llama3": {"context_window": 8192, "tools": False}}), "openai", "llama3")
    assert info.known and info.context_window == 8192 and info.tools is False
    assert info.vision is None and info.max_output_tokens is None


def test_the_config_wins_over_the_table_field_by_field() -> None:
    cfg = config({"gpt-4o": {"context_window": 32_000, "temperature": "max_1"}})
    info = model_info(cfg, "openai", "gpt-4o")
    assert (info.context_window, info.temperature) == (32_000, "max_1")
    assert (info.max_output_tokens, info.vision, info.tools) == (16_384, True, True)
    # Keyed by the exact name: a dated name keeps the table's values.
    assert model_info(cfg, "openai", "gpt-4o-2024-08-06").context_window == 128_000


@pytest.mark.parametrize(("rule", "asked", "sent"), [
    ("any", 1.7, 1.7), ("max_1", 1.7, 1.0), ("max_1", 0.4, 0.4), ("only_1", 0.4, None), ("any", None, None),
])
def test_clamp_temperature(rule: Any, asked: float | None, sent: float | None) -> None:
    assert clamp_temperature(rule, asked) == sent


@pytest.mark.parametrize(("models", "said"), [
    ({"x.y": {"context_window": 0}}, 'models."x.y".context_window: Expected `int` >= 1'),
    ({"x": {"vision": "yes"}}, 'models."x".vision: Expected `bool | null`'),
    ({"x": {"temperature": "hot"}}, "models.\"x\".temperature: Invalid enum value 'hot'"),
    ({"x": {"input_usd_per_mtok": -1, "output_usd_per_mtok": 1}},
     'models."x".input_usd_per_mtok: Expected `float` >= 0'),
    ({"x": {"colour": "red"}}, 'models."x": Object contains unknown field `colour`'),
    ({"x": {"input_usd_per_mtok": 1}}, 'models."x".output_usd_per_mtok: needed with the other price'),
    ({"x": {"free": True, "input_usd_per_mtok": 1, "output_usd_per_mtok": 2}},
     'models."x".free: a free model has no price'),
    ({"x": {"context_window": 100, "max_output_tokens": 200}}, 'models."x".max_output_tokens: 200 is more than'),
])
def test_a_bad_models_entry_is_named(models: dict[str, Any], said: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(models)
    assert str(info.value).startswith(said)
