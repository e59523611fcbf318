"""Request bodies of the service, checked once where they enter (pydantic, strict types).

Every field is typed and bounded: item ids are strings or integers (no floats, booleans, nulls),
lists and strings have maximum lengths, unknown fields are refused. A failure becomes one JSON error
naming the field (`history[3]`), never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError, create_model


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (server options)."""

    max_history: int = 2000  # items in one history (the model reads the most recent max_len)
    max_list: int = 100_000  # items in one allow or deny list
    max_k: int = 1000
    max_beam: int = 512
    max_batch_requests: int = 1024  # users in one /recommend/batch call
    max_id_chars: int = 256
    max_body_bytes: int = 4 << 20


class BadRequest(Exception):
    """A request the service refuses: HTTP status, the field at fault, a message."""

    def __init__(self, status: int, field: str | None, message: str, **extra):
        super().__init__(message)
        self.status, self.field, self.message, self.extra = status, field, message, extra

    def body(self) -> dict:
        return {"error": {"status": self.status, "field": self.field, "message": self.message, **self.extra}}

    def __reduce__(self):  # picklable with every field: the decode process sends it to the server
        return (partial(BadRequest, **self.extra), (self.status, self.field, self.message))


def request_models(limits: Limits) -> tuple[TypeAdapter, TypeAdapter]:
    """TypeAdapters for a /recommend body and a /recommend/batch body under `limits`."""
    item_id = Union[Annotated[StrictStr, Field(min_length=1, max_length=limits.max_id_chars)], StrictInt]
    ids = lambda n, lo=0: Annotated[list[item_id], Field(min_length=lo, max_length=n)]  # noqa: E731
    single = create_model(
        "RecommendRequest", __config__=ConfigDict(extra="forbid"),
        history=(ids(limits.max_history, 1), ...),
        k=(Annotated[StrictInt, Field(ge=1, le=limits.max_k)], 10),
        exclude_seen=(StrictBool, True),
        allow=(ids(limits.max_list) | None, None),
        deny=(ids(limits.max_list) | None, None),
        decode=(Literal["exact", "beam"] | None, None),
        beam=(Annotated[StrictInt, Field(ge=1, le=limits.max_beam)] | None, None),
        on_unknown=(Literal["error", "ignore"], "error"),
    )
    batch = create_model(
        "BatchRequest", __config__=ConfigDict(extra="forbid"),
        requests=(Annotated[list[single], Field(min_length=1, max_length=limits.max_batch_requests)], ...),
    )
    return TypeAdapter(single), TypeAdapter(batch)


def parse(adapter: TypeAdapter, body: bytes) -> BaseModel:
    """Validate a JSON body; BadRequest 400 (not JSON) or 422 (a field) naming the first fault."""
    try:
        return adapter.validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid" or not err["loc"]:
            raise BadRequest(400, None, f"the body is not valid JSON: {err['msg']}") from None
        raise BadRequest(422, field_name(err["loc"]), err["msg"]) from None


def field_name(loc: tuple) -> str:
    """('requests', 2, 'history', 0, 'str') -> 'requests[2].history[0]' (union branch names dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "constrained-str", "list[...]", "function-after[...]") or "[" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


__all__ = ["Limits", "BadRequest", "request_models", "parse", "field_name"]
