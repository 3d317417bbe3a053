"""Route choice in the dispatcher: use case × tier, the default tier, a forced model."""

from __future__ import annotations

import pytest

from router.config import load
from router.errors import ErrorCode
from schemas import Message, Request
from workers.dispatcher import Refusal, choose_route
from workers.processes import DEFAULT_CONFIG

CFG = load(DEFAULT_CONFIG)


def req(use_case: str, tier: str = "default", model: str | None = None) -> Request:
    return Request(id="r", use_case=use_case, account="acme", tier=tier, model=model, reply_to="_INBOX.x",
                   messages=[Message(role="user", content="hi")])


def names(use_case: str, tier: str = "default", model: str | None = None) -> list[str]:
    return [str(t) for t in choose_route(CFG, req(use_case, tier, model))]


def test_use_case_and_tier_pick_the_configured_chain() -> None:
    assert names("draft", "pro") == ["openai:gpt-4o", "anthropic:claude-sonnet-4-5"]
    assert names("draft", "no-such-tier") == names("draft", "default")


def test_a_forced_model_narrows_the_route_by_any_of_its_names() -> None:
    assert names("draft", model="gpt-4o-mini") == ["openai:gpt-4o-mini"]
    assert names("draft", model="anthropic:claude-haiku-4-5") == ["anthropic:claude-haiku-4-5"]


def test_a_forced_model_outside_the_route_is_found_elsewhere_in_the_config() -> None:
    assert names("classify", model="gemini:gemini-2.5-pro") == ["gemini:gemini-2.5-pro"]
    assert names("chat", model="glm-4.6") == ["zai:glm-4.6"]


@pytest.mark.parametrize(("use_case", "model", "said"), [
    ("poetry", None, "no route for use case 'poetry'"),
    ("draft", "gpt-9", "model 'gpt-9' is not served"),
])
def test_no_route_says_why(use_case: str, model: str | None, said: str) -> None:
    with pytest.raises(Refusal) as info:
        choose_route(CFG, req(use_case, model=model))
    assert info.value.code is ErrorCode.NO_ROUTE and said in info.value.message
