"""Request bodies of the three generation routes: validation, what the scheduler needs, and the PD fields.

SGLang's PD protocol: the router sends one body to both servers with ``bootstrap_host`` (the prefill's
host), ``bootstrap_port`` (its bootstrap server) and ``bootstrap_room`` (a random 63-bit id pairing the
two halves); a batch body gets one value per item. The DualPath route hint travels in the ``routing_key``
field of ``/generate`` and in the ``X-SMG-Routing-Key`` header of the OpenAI routes.
"""

from __future__ import annotations

import secrets
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

Route = Literal["generate", "completions", "chat"]
PATHS: dict[Route, str] = {"generate": "/generate", "completions": "/v1/completions",
                           "chat": "/v1/chat/completions"}
DEFAULT_GEN_TOKENS = 16
CHARS_PER_TOKEN = 4  # load estimate of a text prompt the router does not tokenize


ERROR_KINDS = {400: "bad_request", 404: "unknown_model", 413: "too_large", 502: "upstream", 503: "no_capacity"}


class HttpError(Exception):
    """An error answer: the status, a message that names what is wrong, and its kind for the metrics."""

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or ERROR_KINDS.get(status, f"http_{status}")


@dataclass(frozen=True)
class ParsedRequest:
    """A validated body and its size as the scheduler sees it.

    token_ids: the prompt ids of each item as uint32 arrays, when the client sent ids (for hit estimates).
    text_chars: characters of the items sent as text (a rough token count for the load only).
    hit_tokens: each item's hit, where the router's tokenizer found it while encoding (else the decider looks).
    """

    route: Route
    body: dict[str, Any]
    stream: bool
    batch: int | None  # None: one prompt; n: a batch body with n items
    token_ids: tuple[array, ...]
    text_chars: int
    gen_tokens: int
    model: str | None
    routing_key: str = ""  # the client's own (``routing_key`` of /generate, ``X-SMG-Routing-Key`` of the others)
    hit_tokens: tuple[int, ...] = ()

    @property
    def items(self) -> int:
        return self.batch or 1

    @property
    def model_label(self) -> str:
        """Its model as the metrics name it (stock's ``default`` when the body names none)."""
        return self.model or "default"


def _token_ids(value: object) -> array | None:
    """Non-empty token ids as uint32 (SGLang hashes them so), or None; converted in C, not per token."""
    try:
        ids = array("I", value)  # type: ignore[arg-type]
    except (TypeError, OverflowError):
        return None
    return ids if ids else None


def _prompt(value: object, field: str) -> tuple[int | None, tuple[array, ...], int]:
    """(batch, token id arrays, text chars) of a prompt given as text, ids, or a batch of either."""
    if isinstance(value, str) and value:
        return None, (), len(value)
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return len(value), (), sum(len(x) for x in value)
        if all(isinstance(x, list) for x in value):
            batch = [_token_ids(x) for x in value]
            if all(ids is not None for ids in batch):
                return len(value), tuple(batch), 0  # type: ignore[arg-type]
        elif (ids := _token_ids(value)) is not None:
            return None, (ids,), 0
    raise HttpError(400, f"'{field}' must be a non-empty string, a list of token ids (0 <= id < 2**32), "
                    "or a batch of either")


def _non_negative_int(body: dict[str, Any], key: str, where: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise HttpError(400, f"'{where}{key}' must be a non-negative integer, got {value!r}")
    return value


def _message_chars(messages: object) -> int:
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty list of chat messages")
    chars = 0
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise HttpError(400, f"every chat message needs a string 'role'; got {message!r:.80}")
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return chars


def parse_request(route: Route, raw: bytes, models: set[str], routing_key: str | None = None) -> ParsedRequest:
    """Validate a body; ``models`` are the names the servers serve (empty: not known, not checked);
    ``routing_key``: the client's ``X-SMG-Routing-Key`` header (the OpenAI routes)."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise HttpError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise HttpError(400, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise HttpError(400, f"request body must be a JSON object, got {type(body).__name__}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HttpError(400, f"'stream' must be true or false, got {stream!r}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise HttpError(400, f"'model' must be a string, got {model!r}")
    if model is not None and models and model not in models:
        raise HttpError(404, f"model {model!r} is not served here; served models: {sorted(models)}")
    if route == "generate":
        present = [key for key in ("text", "input_ids") if body.get(key) is not None]
        if len(present) != 1:
            raise HttpError(400, "/generate needs exactly one of 'text' and 'input_ids'")
        batch, ids, chars = _prompt(body[present[0]], present[0])
        if (present[0] == "text") != (not ids):
            raise HttpError(400, "'text' takes strings and 'input_ids' token ids, not the other way round")
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise HttpError(400, f"'sampling_params' must be an object, got {params!r}")
        gen = _non_negative_int(params, "max_new_tokens", "sampling_params.")
    elif route == "completions":
        if body.get("prompt") is None:
            raise HttpError(400, "/v1/completions needs a 'prompt'")
        batch, ids, chars = _prompt(body["prompt"], "prompt")
        gen = _non_negative_int(body, "max_tokens", "")
    else:
        batch, ids, chars = None, (), _message_chars(body.get("messages"))
        gen = _non_negative_int(body, "max_completion_tokens", "")
        gen = _non_negative_int(body, "max_tokens", "") if gen is None else gen
    gen_tokens = DEFAULT_GEN_TOKENS if gen is None else gen
    key = body.get("routing_key") if route == "generate" else routing_key
    if key is not None and not isinstance(key, str):
        raise HttpError(400, f"'routing_key' must be a string, got {key!r:.80}")
    return ParsedRequest(route, body, stream, batch, ids, chars, gen_tokens, model, key or "")


def new_rooms(parsed: ParsedRequest) -> int | list[int]:
    """Fresh bootstrap rooms: random in [0, 2**63 - 1], one per batch item."""
    if parsed.batch is None:
        return secrets.randbits(63)
    return [secrets.randbits(63) for _ in range(parsed.batch)]


# sglang-router 0.3.2: the response's id comes from the first of these present (else a new one); the servers
# get the x-request-id and x-correlation-id headers the client sent.
DEFAULT_REQUEST_ID_HEADERS = ("x-request-id", "x-correlation-id", "x-trace-id", "request-id")
FORWARDED_ID_HEADERS = ("x-request-id", "x-correlation-id")
REQUEST_ID_PREFIX: dict[str, str] = {"/generate": "gnt-", "/v1/completions": "cmpl-",
                                     "/v1/chat/completions": "chatcmpl-"}


def request_id(headers: Mapping[str, str], names: Sequence[str] | None, path: str) -> str:
    """The client's request id (the first of ``names`` it sent), or a new one."""
    for name in names or DEFAULT_REQUEST_ID_HEADERS:
        if headers.get(name):
            return headers[name]
    return REQUEST_ID_PREFIX.get(path, "req-") + secrets.token_urlsafe(18)


def merge_input_logprobs(prefill: Any, decode: Any) -> Any:
    """The decode's answer with the prefill's ``meta_info.input_token_logprobs`` in front of its own, as the stock
    router merges them (per item of a batch); unchanged where either side has none."""
    if isinstance(decode, list) and isinstance(prefill, list):
        return [merge_input_logprobs(p, d) for p, d in zip(prefill, decode, strict=False)]
    meta, prefill_meta = (x.get("meta_info") if isinstance(x, dict) else None for x in (decode, prefill))
    if isinstance(meta, dict) and isinstance(prefill_meta, dict) and isinstance(
            meta.get("input_token_logprobs"), list) and isinstance(prefill_meta.get("input_token_logprobs"), list):
        meta["input_token_logprobs"] = prefill_meta["input_token_logprobs"] + meta["input_token_logprobs"]
    return decode


def pd_body(parsed: ParsedRequest, host: str, port: int | None, rooms: int | list[int], routing_key: str) -> bytes:
    """The body both servers get: the client's, plus the bootstrap fields (and the routing key on /generate)."""
    body = dict(parsed.body)
    if isinstance(rooms, list):
        body.update(bootstrap_host=[host] * len(rooms), bootstrap_port=[port] * len(rooms), bootstrap_room=rooms)
    else:
        body.update(bootstrap_host=host, bootstrap_port=port, bootstrap_room=rooms)
    if parsed.route == "generate":
        body["routing_key"] = routing_key
    return msgspec.json.encode(body)
