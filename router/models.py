"""What a model can do: its context window, output limit, vision, tools and temperature rule.

Pure: the built-in table below, genai-prices' context windows, and the config's `[models."name"]`
entries, which win over both. Names are matched by family, so a dated or variant name
(`gpt-4o-2024-08-06`, `claude-haiku-4-5-20251001`, `models/gemini-2.5-flash`) finds its entry.
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache
from typing import TypeVar

import msgspec
from genai_prices import data_snapshot

from .config import Config, ModelConfig, Temperature

# Where genai-prices keeps a wire format's own models.
PRICES_PROVIDER: dict[str, str] = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    known: bool
    """False: neither the table nor the config describes the model; it is used as the config says."""
    context_window: int | None
    """Input + output tokens; None = unknown, never skipped for length."""
    max_output_tokens: int | None
    vision: bool | None
    """None = unknown, not skipped."""
    tools: bool | None
    temperature: Temperature
    """"max_1": Anthropic caps at 1; "only_1": OpenAI reasoning models accept only 1."""


class _Entry(msgspec.Struct, frozen=True):
    context_window: int | None
    max_output_tokens: int | None
    vision: bool | None
    tools: bool | None
    temperature: Temperature = "any"


_T = TypeVar("_T")

_M = 1_048_576

# Keyed by family name; a name matches the longest key it starts with, at a `-` boundary. Context
# windows here are used only where genai-prices has none.
_TABLE: dict[str, _Entry] = {
    # OpenAI chat models.
    "gpt-3.5-turbo": _Entry(16_385, 4_096, vision=False, tools=True),
    "gpt-4": _Entry(8_192, 8_192, vision=False, tools=True),
    "gpt-4-turbo": _Entry(128_000, 4_096, vision=True, tools=True),
    "gpt-4o": _Entry(128_000, 16_384, vision=True, tools=True),
    "gpt-4o-mini": _Entry(128_000, 16_384, vision=True, tools=True),
    "gpt-4.1": _Entry(1_047_576, 32_768, vision=True, tools=True),
    "gpt-4.1-mini": _Entry(1_047_576, 32_768, vision=True, tools=True),
    "gpt-4.1-nano": _Entry(1_047_576, 32_768, vision=True, tools=True),
    # OpenAI reasoning models: any temperature but 1 is refused with a 400.
    "o1": _Entry(200_000, 100_000, vision=True, tools=True, temperature="only_1"),
    "o1-mini": _Entry(128_000, 65_536, vision=False, tools=False, temperature="only_1"),
    "o3": _Entry(200_000, 100_000, vision=True, tools=True, temperature="only_1"),
    "o3-mini": _Entry(200_000, 100_000, vision=False, tools=True, temperature="only_1"),
    "o4-mini": _Entry(200_000, 100_000, vision=True, tools=True, temperature="only_1"),
    "gpt-5": _Entry(400_000, 128_000, vision=True, tools=True, temperature="only_1"),
    "gpt-5-mini": _Entry(400_000, 128_000, vision=True, tools=True, temperature="only_1"),
    "gpt-5-nano": _Entry(400_000, 128_000, vision=True, tools=True, temperature="only_1"),
    "gpt-5.1": _Entry(400_000, 128_000, vision=True, tools=True, temperature="only_1"),
    "gpt-5.2": _Entry(400_000, 128_000, vision=True, tools=True, temperature="only_1"),
    # Anthropic: temperature is 0–1.
    "claude-3-haiku": _Entry(200_000, 4_096, vision=True, tools=True, temperature="max_1"),
    "claude-3-5-haiku": _Entry(200_000, 8_192, vision=True, tools=True, temperature="max_1"),
    "claude-3-5-sonnet": _Entry(200_000, 8_192, vision=True, tools=True, temperature="max_1"),
    "claude-3-7-sonnet": _Entry(200_000, 64_000, vision=True, tools=True, temperature="max_1"),
    "claude-sonnet-4": _Entry(200_000, 64_000, vision=True, tools=True, temperature="max_1"),
    "claude-sonnet-4-5": _Entry(200_000, 64_000, vision=True, tools=True, temperature="max_1"),
    "claude-haiku-4-5": _Entry(200_000, 64_000, vision=True, tools=True, temperature="max_1"),
    "claude-opus-4": _Entry(200_000, 32_000, vision=True, tools=True, temperature="max_1"),
    "claude-opus-4-1": _Entry(200_000, 32_000, vision=True, tools=True, temperature="max_1"),
    "claude-opus-4-5": _Entry(200_000, 64_000, vision=True, tools=True, temperature="max_1"),
    # Google Gemini: temperature is 0–2.
    "gemini-1.5-flash": _Entry(_M, 8_192, vision=True, tools=True),
    "gemini-1.5-pro": _Entry(2 * _M, 8_192, vision=True, tools=True),
    "gemini-2.0-flash": _Entry(_M, 8_192, vision=True, tools=True),
    "gemini-2.0-flash-lite": _Entry(_M, 8_192, vision=True, tools=True),
    "gemini-2.5-flash": _Entry(_M, 65_536, vision=True, tools=True),
    "gemini-2.5-flash-lite": _Entry(_M, 65_536, vision=True, tools=True),
    "gemini-2.5-pro": _Entry(_M, 65_536, vision=True, tools=True),
    "gemini-3-flash": _Entry(_M, 65_536, vision=True, tools=True),
    "gemini-3-pro": _Entry(_M, 65_536, vision=True, tools=True),
    # Z.ai (OpenAI-compatible): text only; temperature is 0–1.
    "glm-4.5": _Entry(128_000, 96_000, vision=False, tools=True, temperature="max_1"),
    "glm-4.6": _Entry(200_000, 128_000, vision=False, tools=True, temperature="max_1"),
}

_FORMAT_TEMPERATURE: dict[str, Temperature] = {"anthropic": "max_1"}

# Date suffixes providers add to pinned versions: -2024-08-06, -20251001, -0613, -latest.
_DATED = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{4}|-latest)$")


def _family(model: str) -> str | None:
    """The table key `model` belongs to, or None. A vendor prefix (`models/`, `openai/`) is ignored."""
    name = model.rsplit("/", 1)[-1].lower()
    while name:
        if name in _TABLE:
            return name
        shorter = _DATED.sub("", name)
        name = shorter if shorter != name else name.rpartition("-")[0]
    return None


@lru_cache(maxsize=1024)  # bounded: a forced model name comes from the request
def _prices_window(fmt: str, model: str) -> int | None:
    provider = PRICES_PROVIDER.get(fmt)
    if provider is None:
        return None
    try:
        with warnings.catch_warnings():
            # genai-prices warns when its bundled snapshot is old; a window is still a window.
            warnings.simplefilter("ignore")
            _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
    except LookupError:
        return None
    return info.context_window


def model_info(cfg: Config, fmt: str, model: str) -> ModelInfo:
    """What `model`, served over wire format `fmt` ("openai" | "anthropic" | "gemini"), can do.

    The config's `[models."<model>"]` fields win; then the table (context window from genai-prices
    where it has one). A model neither knows is `known=False`, with every capability unknown.
    """
    own = cfg.models.get(model)
    entry = _table_entry(fmt, model)
    known = entry is not None or own is not None
    if entry is None:
        entry = _Entry(None, None, vision=None, tools=None, temperature=_FORMAT_TEMPERATURE.get(fmt, "any"))
    own = own or ModelConfig()
    return ModelInfo(
        name=model,
        known=known,
        context_window=_first(own.context_window, entry.context_window),
        max_output_tokens=_first(own.max_output_tokens, entry.max_output_tokens),
        vision=_first(own.vision, entry.vision),
        tools=_first(own.tools, entry.tools),
        temperature=own.temperature or entry.temperature,
    )


def _table_entry(fmt: str, model: str) -> _Entry | None:
    """The built-in entry for `model`, its context window taken from genai-prices when it has one."""
    key = _family(model)
    if key is None:
        return None
    entry = _TABLE[key]
    window = _prices_window(fmt, model)
    return msgspec.structs.replace(entry, context_window=window) if window else entry


def temperature_rule(fmt: str, model: str) -> Temperature:
    """The table's temperature rule (adapters have no config); for a model it does not know, the
    wire format's own (Anthropic's API caps every model at 1)."""
    key = _family(model)
    return _TABLE[key].temperature if key else _FORMAT_TEMPERATURE.get(fmt, "any")


def clamp_temperature(rule: Temperature, temperature: float | None) -> float | None:
    """The temperature to send under `rule`; None means send none (the provider's default)."""
    if temperature is None:
        return None
    if rule == "max_1":
        return min(temperature, 1.0)
    if rule == "only_1":
        # Dropped rather than forced: these models refuse any value but their default (1), so
        # leaving it out always works and never depends on what a request asked for.
        return None
    return temperature


def _first(own: _T | None, table: _T | None) -> _T | None:
    return own if own is not None else table
