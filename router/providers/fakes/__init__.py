"""Fake LLM providers: real local HTTP servers speaking each provider's wire format."""

from .common import BUILTIN, FakeServer, FakeToolCall, Scenario
from .openai import FakeOpenAI

__all__ = ["BUILTIN", "FakeOpenAI", "FakeServer", "FakeToolCall", "Scenario"]
