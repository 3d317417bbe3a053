"""Fake LLM providers: real local HTTP servers speaking each provider's wire format."""

from .common import BUILTIN, FakeServer, FakeToolCall, Scenario
from .anthropic import FakeAnthropic
from .openai import FakeOpenAI

__all__ = ["BUILTIN", "FakeAnthropic", "FakeOpenAI", "FakeServer", "FakeToolCall", "Scenario"]
