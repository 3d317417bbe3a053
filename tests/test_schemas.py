"""Wire messages (schemas/), routing config (router/config.py), error taxonomy (router/errors.py)."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from router import config
from router.config import Config, ConfigError
from router.errors import ErrorCode, SwitchyardError
from schemas import (
    Attempt,
    Chunk,
    CompletionEvent,
    Done,
    Error,
    ImagePart,
    InvalidMessage,
    Message,
    NamedToolChoice,
    Request,
    Target,
    TextPart,
    Tool,
    ToolCall,
    Usage,
    WorkItem,
    decode_event,
    decode_reply,
    decode_request,
    decode_work,
    encode,
    peek_request,
)

EXAMPLE_TOML = Path(__file__).resolve().parent.parent / "workers" / "example.toml"

Raw = dict[str, Any]


def _full_request() -> Request:
    """A request that sets every optional field, with both kinds of image and a tool round trip."""
    return Request(
        v=1,
        id="01JD7SB4M2K6W9Q0C3T5V8X1ZE",
        use_case="chat",
        account="acme",
        tier="pro",
        messages=[
            Message(role="system", content="Answer in one sentence."),
            Message(
                role="user",
                content=[
                    TextPart(text="Which of these is warmer?"),
                    ImagePart(url="https://files.example.com/paris.png"),
                    ImagePart(data="aGVsbG8=", media_type="image/png"),
                ],
            ),
            Message(
                role="assistant",
                tool_calls=[ToolCall(id="call_1", name="get_weather", arguments={"city": "Paris"})],
            ),
            Message(role="tool", tool_call_id="call_1", content='{"celsius": 14}'),
        ],
        max_tokens=300,
        temperature=0.2,
        model="openai:gpt-4o",
        stream=True,
        tools=[
            Tool(
                name="get_weather",
                description="Current weather for a city",
                parameters={"type": "object", "properties": {"city": {"type": "string"}}},
            ),
            Tool(name="answer"),
        ],
        tool_choice=NamedToolChoice(name="answer"),
        reply_to="llm.res.acme.weather-bot.01JD7SB4M2K6W9Q0C3T5V8X1ZE",
        timeout_ms=120_000,
        metadata={"team": "weather"},
    )


def _done() -> Done:
    return Done(
        id="r1",
        seq=3,
        text="",
        tool_calls=[ToolCall(id="call_1", name="get_weather", arguments={"city": "Lyon"})],
        finish_reason="tool_calls",
        provider="anthropic",
        model="claude-haiku-4-5",
        usage=Usage(
            input_tokens=2210,
            output_tokens=164,
            cache_read_tokens=1900,
            cache_write_tokens=250,
            reasoning_tokens=48,
        ),
        cost_usd=0.00127,
        attempts=[
            Attempt(pool="openai", model="gpt-4o-mini", error="PROVIDER_UNAVAILABLE", latency_ms=3),
            Attempt(pool="anthropic", model="claude-haiku-4-5", latency_ms=1240),
        ],
        latency_ms=1251,
        ttft_ms=None,
    )


# --- round trips ---------------------------------------------------------------


def test_full_request_round_trips() -> None:
    req = _full_request()
    decoded = decode_request(encode(req), use_case="chat", account="acme")
    assert decoded == req
    assert isinstance(decoded.tool_choice, NamedToolChoice)
    assert decoded.messages[1].content == [
        TextPart(text="Which of these is warmer?"),
        ImagePart(url="https://files.example.com/paris.png"),
        ImagePart(data="aGVsbG8=", media_type="image/png"),
    ]


@pytest.mark.parametrize("choice", ["auto", "none", "required"])
def test_string_tool_choice_round_trips(choice: str) -> None:
    req = _full_request()
    req.tool_choice = choice  # type: ignore[assignment]
    assert decode_request(encode(req)).tool_choice == choice


def test_request_defaults_are_not_encoded() -> None:
    req = Request(id="r1", account="acme", messages=[Message(role="user", content="hi")], reply_to="_INBOX.x")
    assert json.loads(encode(req)) == {
        "id": "r1",
        "account": "acme",
        "messages": [{"role": "user", "content": "hi"}],
        "reply_to": "_INBOX.x",
    }
    assert decode_request(encode(req)) == req


@pytest.mark.parametrize(
    "reply",
    [
        Chunk(id="r1", seq=0, text="Hi"),
        _done(),
        Done(id="r1", seq=0, provider="openai", model="gpt-4o-mini"),
        Error(
            id="r1",
            seq=2,
            code="RATE_LIMITED",
            status=429,
            message="slow down",
            retryable=True,
            retry_after_ms=350,
        ),
        Error(id="r1", seq=0, code="NO_ROUTE", status=404, message="no route for chat/pro", retryable=False),
    ],
    ids=lambda r: type(r).__name__.lower(),
)
def test_reply_round_trips_through_decode_reply(reply: Chunk | Done | Error) -> None:
    data = encode(reply)
    assert json.loads(data)["type"] == type(reply).__name__.lower()
    decoded = decode_reply(data)
    assert type(decoded) is type(reply)
    assert decoded == reply


def test_reply_with_unknown_type_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_reply(b'{"type": "progress", "id": "r1", "seq": 0}')


def test_usage_omits_zero_fields() -> None:
    assert encode(Usage(input_tokens=12, output_tokens=3)) == b'{"input_tokens":12,"output_tokens":3}'
    assert encode(Usage()) == b"{}"
    assert msgspec.json.decode(b"{}", type=Usage) == Usage()


def test_work_item_round_trips() -> None:
    work = WorkItem(
        request=_full_request(),
        route=[
            Target(pool="anthropic", model="claude-haiku-4-5"),
            Target(pool="gemini", model="gemini-2.5-pro"),
        ],
        attempts=[Attempt(pool="openai", model="gpt-4o", error="TIMEOUT", latency_ms=30_000)],
        accepted_ms=1_732_612_800_000,
    )
    assert decode_work(encode(work)) == work
    assert str(work.route[0]) == "anthropic:claude-haiku-4-5"


def test_work_item_needs_a_route() -> None:
    work = WorkItem(request=_full_request(), route=[Target(pool="a", model="m")], accepted_ms=1)
    raw = json.loads(encode(work))
    raw["route"] = []
    with pytest.raises(msgspec.ValidationError, match=r"\$\.route"):
        decode_work(json.dumps(raw).encode())


def test_completion_event_round_trips() -> None:
    event = CompletionEvent(
        id="r1",
        account="acme",
        use_case="chat",
        tier="pro",
        status="ok",
        provider="anthropic",
        model="claude-haiku-4-5",
        attempts=_done().attempts,
        usage=_done().usage,
        raw_usage={"input_tokens": 60, "cache_read_input_tokens": 1900, "output_tokens": 164},
        cost_usd=0.00127,
        latency_ms=1251,
        ttft_ms=402,
        started_ms=1_732_612_800_000,
        finished_ms=1_732_612_801_251,
        prompt_chars=8412,
        prompt_sha256="9f" * 32,
        finish_reason="tool_calls",
        metadata={"team": "weather"},
    )
    assert decode_event(encode(event)) == event
    failed = CompletionEvent(
        id="r2",
        account="acme",
        use_case="chat",
        status="error",
        code="BUDGET_EXCEEDED",
        started_ms=1,
        finished_ms=2,
    )
    assert decode_event(encode(failed)) == failed


# --- request validation ----------------------------------------------------------


def _base() -> Raw:
    return {
        "id": "r1",
        "account": "acme",
        "messages": [{"role": "user", "content": "hi"}],
        "reply_to": "_INBOX.abc",
    }


def _refusal(data: bytes, **subject: str) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        decode_request(data, **subject)
    return info.value


def test_malformed_json_is_refused_without_a_field() -> None:
    err = _refusal(b'{"id": "r1", "account": ')
    assert err.field is None
    assert "not valid JSON" in str(err)


def test_a_json_value_that_is_not_an_object_is_refused() -> None:
    err = _refusal(b'["id", "r1"]')
    assert err.field is None
    assert "Expected `object`, got `array`" in str(err)


def _drop(key: str) -> Callable[[Raw], None]:
    return lambda r: r.pop(key)


def _set(**kv: Any) -> Callable[[Raw], None]:
    return lambda r: r.update(kv)


def _msg(**kv: Any) -> Callable[[Raw], None]:
    return lambda r: r["messages"][0].update(kv)


def _add_msg(msg: Raw) -> Callable[[Raw], None]:
    return lambda r: r["messages"].append(msg)


# (case id, how to break the base request, field the error must name, words the message must contain)
INVALID: list[tuple[str, Callable[[Raw], None], str, str]] = [
    ("missing id", _drop("id"), "$.id", "missing required field `id`"),
    ("missing account", _drop("account"), "$.account", "missing required field `account`"),
    ("missing messages", _drop("messages"), "$.messages", "missing required field `messages`"),
    ("missing reply_to", _drop("reply_to"), "$.reply_to", "missing required field `reply_to`"),
    ("empty id", _set(id=""), "$.id", "length >= 1"),
    ("empty messages", _set(messages=[]), "$.messages", "length >= 1"),
    ("bad role", _msg(role="bot"), "$.messages[0].role", "'bot'"),
    (
        "tool message without tool_call_id",
        _add_msg({"role": "tool", "content": "14C"}),
        "$.messages[1]",
        "role `tool` needs `tool_call_id`",
    ),
    (
        "tool_calls on a user message",
        _msg(tool_calls=[{"id": "c1", "name": "f"}]),
        "$.messages[0]",
        "only a message with role `assistant` may carry `tool_calls`",
    ),
    ("message without content", _msg(content=None), "$.messages[0]", "needs `content`"),
    (
        "system content not a string",
        lambda r: r["messages"].insert(
            0, {"role": "system", "content": [{"type": "text", "text": "be brief"}]}
        ),
        "$.messages[0]",
        "`system` message's `content` must be a string",
    ),
    (
        "image with neither url nor data",
        _msg(content=[{"type": "image"}]),
        "$.messages[0].content[0]",
        "exactly one of `url` or `data`",
    ),
    (
        "image with both url and data",
        _msg(
            content=[{"type": "image", "url": "https://x/y.png", "data": "aGk=", "media_type": "image/png"}]
        ),
        "$.messages[0].content[0]",
        "exactly one of `url` or `data`",
    ),
    (
        "image data without media_type",
        _msg(content=[{"type": "image", "data": "aGk="}]),
        "$.messages[0].content[0]",
        "needs `media_type`",
    ),
    (
        "unknown part type",
        _msg(content=[{"type": "audio", "data": "aGk="}]),
        "$.messages[0].content[0].type",
        "'audio'",
    ),
    (
        "reply_to outside the allowed prefixes",
        _set(reply_to="orders.replies"),
        "$.reply_to",
        "must start with `_INBOX.` or `llm.res.`",
    ),
    ("reply_to with a * wildcard", _set(reply_to="_INBOX.*"), "$.reply_to", "no spaces or wildcards"),
    ("reply_to with a > wildcard", _set(reply_to="llm.res.>"), "$.reply_to", "no spaces or wildcards"),
    ("reply_to with a space", _set(reply_to="_INBOX.a b"), "$.reply_to", "no spaces or wildcards"),
    ("tool_choice without tools", _set(tool_choice="required"), "$.tool_choice", "`tools` is empty"),
    ("named tool_choice without tools", _set(tool_choice={"name": "f"}), "$.tool_choice", "`tools` is empty"),
    ("unknown tool_choice", _set(tool_choice="always", tools=[{"name": "f"}]), "$.tool_choice", "'always'"),
    ("max_tokens 0", _set(max_tokens=0), "$.max_tokens", ">= 1"),
    ("temperature 3", _set(temperature=3), "$.temperature", "<= 2.0"),
    ("v 2", _set(v=2), "$.v", "2"),
    ("timeout_ms too large", _set(timeout_ms=3_600_001), "$.timeout_ms", "<= 3600000"),
    ("timeout_ms 0", _set(timeout_ms=0), "$.timeout_ms", ">= 1"),
    ("account with a dot", _set(account="acme.eu"), "$.account", "regex"),
    ("tier with a wildcard", _set(tier="*"), "$.tier", "regex"),
    ("tool name with a space", _set(tools=[{"name": "get weather"}]), "$.tools[0].name", "regex"),
    ("metadata value not a string", _set(metadata={"n": 1}), "$.metadata[...]", "Expected `str`"),
]


@pytest.mark.parametrize(("mutate", "field", "words"), [pytest.param(*c[1:], id=c[0]) for c in INVALID])
def test_invalid_request_names_the_field(mutate: Callable[[Raw], None], field: str, words: str) -> None:
    raw = _base()
    mutate(raw)
    err = _refusal(json.dumps(raw).encode())
    assert err.field == field
    assert str(err).startswith("invalid request: ")
    assert words in str(err)


def test_tool_choice_none_needs_no_tools() -> None:
    assert decode_request(json.dumps({**_base(), "tool_choice": "none"}).encode()).tool_choice == "none"


def test_account_must_match_the_subject() -> None:
    err = _refusal(json.dumps(_base()).encode(), use_case="chat", account="globex")
    assert err.field == "$.account"
    assert "'acme'" in str(err) and "'globex'" in str(err)


def test_use_case_must_match_the_subject() -> None:
    err = _refusal(json.dumps({**_base(), "use_case": "draft"}).encode(), use_case="chat", account="acme")
    assert err.field == "$.use_case"
    assert "'draft'" in str(err) and "'chat'" in str(err)


def test_use_case_defaults_to_the_subject() -> None:
    req = decode_request(json.dumps(_base()).encode(), use_case="chat", account="acme")
    assert req.use_case == "chat"
    assert req.account == "acme"


def test_matching_use_case_is_accepted() -> None:
    data = json.dumps({**_base(), "use_case": "chat"}).encode()
    req = decode_request(data, use_case="chat", account="acme")
    assert req.use_case == "chat"


def test_defaults_of_a_minimal_request() -> None:
    req = decode_request(json.dumps(_base()).encode())
    assert (req.v, req.tier, req.stream, req.timeout_ms) == (1, "default", False, 60_000)
    assert (req.max_tokens, req.temperature, req.model, req.tools, req.tool_choice) == (None,) * 5
    assert req.use_case is None
    assert req.metadata == {}


def test_llm_res_reply_to_and_the_largest_timeout_are_accepted() -> None:
    raw = {**_base(), "reply_to": "llm.res.acme.batch-7.r1", "timeout_ms": 3_600_000}
    req = decode_request(json.dumps(raw).encode())
    assert (req.reply_to, req.timeout_ms) == ("llm.res.acme.batch-7.r1", 3_600_000)


def test_assistant_message_may_carry_only_tool_calls() -> None:
    raw = _base()
    raw["messages"].append({"role": "assistant", "tool_calls": [{"id": "c1", "name": "f"}]})
    raw["messages"].append({"role": "tool", "tool_call_id": "c1", "content": "ok"})
    req = decode_request(json.dumps(raw).encode())
    assert req.messages[1].tool_calls == [ToolCall(id="c1", name="f", arguments={})]
    assert req.messages[2].tool_call_id == "c1"


# --- peek_request ----------------------------------------------------------------


def test_peek_reads_id_and_reply_to_of_an_invalid_request() -> None:
    data = json.dumps({**_base(), "messages": [], "temperature": 9}).encode()
    with pytest.raises(InvalidMessage):
        decode_request(data)
    assert peek_request(data) == ("r1", "_INBOX.abc")


def test_peek_keeps_what_it_can_when_other_fields_have_wrong_types() -> None:
    assert peek_request(b'{"id": "r1", "reply_to": 7, "account": ["x"]}') == ("r1", None)
    assert peek_request(b'{"id": 12, "reply_to": "_INBOX.abc"}') == (None, "_INBOX.abc")


@pytest.mark.parametrize("data", [b"", b"not json", b"[1, 2]", b'"r1"', b"\xff\xfe"])
def test_peek_returns_nothing_from_garbage(data: bytes) -> None:
    assert peek_request(data) == (None, None)


def test_peek_reads_past_what_no_decoder_accepts() -> None:
    deep = b"[" * 5000 + b"]" * 5000
    body = b'{"id": "r1", "tools": ' + deep + b', "m": {"id": "inner"}, "reply_to": "_INBOX.a"}'
    assert peek_request(body) == ("r1", "_INBOX.a")
    assert peek_request(b'{"id": "r2", "x": "\\udcff", "reply_to": "_INBOX.b"}') == ("r2", "_INBOX.b")
    # Cut short: an id is all it finds, and without a reply subject nobody is answered.
    assert peek_request(b'{"id": "r1", "reply_to"') == ("r1", None)


@pytest.mark.parametrize("reply_to", ["_INBOX." + "x" * 5000, "_INBOX.a b", "_INBOX.a..b", "_INBOX.*", "other.x"])
def test_peek_gives_no_reply_subject_the_door_would_refuse(reply_to: str) -> None:
    assert peek_request(json.dumps({"id": "r1", "reply_to": reply_to}).encode()) == ("r1", None)


# --- routing config ----------------------------------------------------------------


def _example_raw() -> Raw:
    return tomllib.loads(EXAMPLE_TOML.read_text())


def _config_error(mutate: Callable[[Raw], None]) -> str:
    raw = _example_raw()
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        config.from_mapping(raw)
    return str(info.value)


def test_shipped_example_config_loads() -> None:
    cfg = config.load(EXAMPLE_TOML)
    assert set(cfg.providers) == {"openai", "anthropic", "gemini", "zai"}
    assert set(cfg.pools) == {"openai", "anthropic", "gemini", "zai"}
    assert {"draft", "summary", "complex", "general", "vision", "voice"} <= set(cfg.routes)
    assert all(cfg.pools[p].provider in cfg.providers for p in cfg.pools)
    assert cfg.pools["anthropic"].retry.attempts == 3  # defaults fill what the file leaves out
    assert cfg.subject_prefix == "llm"
    assert config.decode(config.encode(cfg)) == cfg


def test_load_names_the_file_when_it_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[pools.openai\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        config.load(path)


def test_unknown_provider_in_a_pool() -> None:
    msg = _config_error(lambda r: r["pools"]["zai"].update(provider="mistral"))
    assert msg == "pools.zai.provider: unknown provider 'mistral'"


@pytest.mark.parametrize("target", ["gpt-4o", ":gpt-4o", "openai:"])
def test_bad_target_string(target: str) -> None:
    msg = _config_error(lambda r: r["routes"]["chat"].update(pro=["openai:gpt-4o", target]))
    assert msg.startswith("routes.chat.pro[1]: ")
    assert "`pool:model`" in msg


def test_unknown_pool_in_a_route() -> None:
    msg = _config_error(lambda r: r["routes"]["draft"].update(default=["mistral:large"]))
    assert msg == "routes.draft.default[0]: unknown pool 'mistral'"


def test_empty_route() -> None:
    msg = _config_error(lambda r: r["routes"]["draft"].update(pro=[]))
    assert msg == "routes.draft.pro: needs at least one target"


def test_base_url_must_be_http() -> None:
    msg = _config_error(lambda r: r["providers"]["zai"].update(base_url="api.z.ai"))
    assert msg.startswith("providers.zai.base_url: ")


def test_wrong_type_names_the_field_path() -> None:
    msg = _config_error(lambda r: r["limits"]["default"]["rate"].update(burst="fifty"))
    assert msg == "limits.default.rate.burst: Expected `int`, got `str`"


def test_unknown_key_names_the_field_path() -> None:
    msg = _config_error(lambda r: r["limits"]["default"]["budget"].update(weekly_usd=10.0))
    assert msg == "limits.default.budget: Object contains unknown field `weekly_usd`"


def test_unknown_top_level_key_is_named() -> None:
    msg = _config_error(lambda r: r.update(pool={}))
    assert "unknown field `pool`" in msg


def test_wrong_type_inside_a_named_pool_names_the_setting() -> None:
    msg = _config_error(lambda r: r["pools"]["openai"].update(concurrency="many"))
    assert "pools" in msg and "concurrency: Expected `int`, got `str`" in msg


def test_wrong_type_inside_a_named_pool_names_the_pool() -> None:
    msg = _config_error(lambda r: r["pools"]["openai"].update(concurrency="many"))
    assert msg.startswith("pools.openai.concurrency: ")


def test_unknown_key_inside_a_named_provider_names_the_provider() -> None:
    msg = _config_error(lambda r: r["providers"]["openai"].update(api_key="sk-not-here"))
    assert msg.startswith("providers.openai: ")
    assert "`api_key`" in msg


def test_route_that_is_not_a_list_names_the_route() -> None:
    msg = _config_error(lambda r: r["routes"]["chat"].update(default="openai:gpt-4o"))
    assert msg.startswith("routes.chat.default: ")


def test_route_prefers_the_tier_and_falls_back_to_default() -> None:
    cfg = config.load(EXAMPLE_TOML)
    assert cfg.route("draft", "pro") == [
        Target(pool="anthropic", model="claude-sonnet-4-5"),
        Target(pool="gemini", model="gemini-2.5-pro"),
        Target(pool="openai", model="gpt-4o"),
    ]
    default = [Target(pool="openai", model="gpt-4o-mini"), Target(pool="gemini", model="gemini-2.5-flash")]
    assert cfg.route("classify", "default") == default
    assert cfg.route("classify", "pro") == default  # classify has no `pro` tier
    assert cfg.route("poetry", "default") is None


def test_route_is_none_when_the_use_case_has_no_default_tier() -> None:
    cfg: Config = config.from_mapping(
        {
            "providers": {"openai": {"format": "openai", "base_url": "https://api.openai.com/v1"}},
            "pools": {"openai": {"provider": "openai"}},
            "routes": {"chat": {"pro": ["openai:gpt-4o"]}},
        }
    )
    assert cfg.route("chat", "pro") == [Target(pool="openai", model="gpt-4o")]
    assert cfg.route("chat", "default") is None
    assert cfg.route("chat", "free") is None


# --- error taxonomy ------------------------------------------------------------------

# The wire contract's table, written out again on purpose: the code must not drift from it.
WIRE_TABLE = {
    "INVALID_REQUEST": (400, False),
    "CONTEXT_TOO_LONG": (400, False),
    "UNAUTHORIZED": (401, False),
    "BUDGET_EXCEEDED": (402, False),
    "RATE_LIMITED": (429, True),
    "NO_ROUTE": (404, False),
    "PROVIDER_ERROR": (502, True),
    "PROVIDER_UNAVAILABLE": (503, True),
    "TIMEOUT": (504, True),
    "INTERNAL": (500, True),
}


def test_error_codes_match_the_wire_table() -> None:
    assert {c.value: (c.status, c.retryable) for c in ErrorCode} == WIRE_TABLE


@pytest.mark.parametrize("code", list(ErrorCode), ids=str)
def test_error_round_trips_through_a_reply(code: ErrorCode) -> None:
    err = SwitchyardError(code, "something went wrong", retry_after_ms=250 if code.retryable else None)
    reply = err.to_reply("r1", 4)
    assert reply == Error(
        id="r1",
        seq=4,
        code=code.value,
        status=WIRE_TABLE[code.value][0],
        message="something went wrong",
        retryable=WIRE_TABLE[code.value][1],
        retry_after_ms=250 if code.retryable else None,
    )
    decoded = decode_reply(encode(reply))
    assert isinstance(decoded, Error)
    back = SwitchyardError.from_reply(decoded)
    assert (back.code, back.message, back.retry_after_ms) == (err.code, err.message, err.retry_after_ms)
    assert (back.status, back.retryable) == (err.status, err.retryable)


def test_unknown_code_in_a_reply_becomes_internal() -> None:
    reply = Error(id="r1", seq=0, code="QUOTA_MELTED", status=599, message="new in v1.3", retryable=False)
    err = SwitchyardError.from_reply(reply)
    assert err.code is ErrorCode.INTERNAL
    assert err.message == "new in v1.3"
