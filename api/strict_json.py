"""Request bodies parsed as JSON is defined (RFC 8259), not as Python's `json` allows.

Python's parser accepts `NaN`, `Infinity` and `-Infinity`, turns `1e400` into infinity and lets
`"\\ud800"` (half a surrogate pair, no character at all) through; each would surface later as a
500 (a NaN penalty in the sampler, a string no tokenizer can encode). Here they are malformed JSON:
FastAPI answers 400 in the dialect's format, as for any other syntax error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


def loads(body: bytes | str) -> Any:
    """Parse strict JSON; json.JSONDecodeError (with the reason) for what JSON does not allow."""
    text = body.decode() if isinstance(body, bytes) else body

    def no_constant(name: str) -> float:
        raise json.JSONDecodeError(f"{name} is not a JSON value (numbers must be finite)", text, text.find(name))

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):
            raise json.JSONDecodeError(f"number {number} is out of range", text, text.find(number))
        return value

    value = json.loads(text, parse_constant=no_constant, parse_float=finite)
    _check_strings(value, text)
    return value


def _check_strings(value: Any, text: str) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _encodable(item, text)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, inner in item.items():
                _encodable(key, text)
                stack.append(inner)


def _encodable(string: str, text: str) -> None:
    try:
        string.encode()
    except UnicodeEncodeError as exc:
        reason = f"lone surrogate \\u{ord(string[exc.start]):04x} is not a character"
        raise json.JSONDecodeError(reason, text, 0) from None


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed by `loads` (use as `APIRouter(route_class=...)`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
