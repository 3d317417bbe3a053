"""Fake LLM providers: real local HTTP servers speaking each provider's wire format."""

from .anthropic import FakeAnthropic
from .common import BUILTIN, FakeServer, FakeToolCall, Scenario
from .gemini import FakeGemini
from .openai import FakeOpenAI

__all__ = ["BUILTIN", "FakeAnthropic", "FakeGemini", "FakeOpenAI", "FakeServer", "FakeToolCall", "Scenario"]
