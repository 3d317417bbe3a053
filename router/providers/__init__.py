"""Provider adapters, one module per wire format. Each only translates."""

from __future__ import annotations

from types import ModuleType

from . import anthropic, gemini, openai
from .base import Adapter, Event, Finished, HttpCall, TextDelta, run

_ADAPTERS: dict[str, ModuleType] = {"openai": openai, "anthropic": anthropic, "gemini": gemini}


def adapter_for(fmt: str) -> Adapter:
    """The adapter module for a wire format. Raises KeyError for a format with no adapter yet."""
    return _ADAPTERS[fmt]


__all__ = ["Adapter", "Event", "Finished", "HttpCall", "TextDelta", "adapter_for", "run"]
