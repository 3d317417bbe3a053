"""Fake LLM providers: real local HTTP servers speaking each provider's wire format."""

from .common import BUILTIN, FakeServer, FakeToolCall, Scenario
from .anthropic import FakeAnthropic
from .gemini import FakeGemini
from .openai import FakeOpenAI

__all__ = ["BUILTIN", "FakeAnthropic", "FakeGemini", "FakeOpenAI", "FakeServer", "FakeToolCall", "Scenario"]
