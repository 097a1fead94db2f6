"""One rule at the edge for every route: text the database cannot store never reaches a handler.

Postgres text refuses NUL, and UTF-8 has no lone surrogates; either would otherwise surface as a 500 deep in
a query. The path, the query string and a POST's form body must be UTF-8 without NUL; a POST body must be a
small URL-encoded form (what the console's pages send). Anything else is answered here with a plain message.
"""
from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.responses import PlainTextResponse

MAX_FORM_BYTES = 64 * 1024
_FORM = b"application/x-www-form-urlencoded"


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def check_text(raw: bytes, where: str) -> None:
    """Refuse percent-encoded text that is not UTF-8 or holds a NUL."""
    try:
        text = unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, f"the {where} is not valid UTF-8 text") from None
    if "\x00" in text:
        raise Refused(400, f"the {where} contains a NUL character")


class TextGuard:
    """Pure ASGI middleware: reads a POST body once (bounded) and hands the same bytes on."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            check_text(scope.get("raw_path") or scope["path"].encode("utf-8", "surrogatepass"), "address")
            check_text(scope.get("query_string", b""), "query string")
            if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
                body = await self._body(scope, receive)
                receive = _replay(body, receive)
        except Refused as exc:
            response = PlainTextResponse(f"Not accepted: {exc}.", status_code=exc.status)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    @staticmethod
    async def _body(scope, receive) -> bytes:
        headers = dict(scope.get("headers") or [])
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_FORM_BYTES:
                raise Refused(413, f"the form is larger than {MAX_FORM_BYTES // 1024} KiB")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if body:
            if headers.get(b"content-type", b"").split(b";")[0].strip().lower() != _FORM:
                raise Refused(415, "a POST here is a URL-encoded form")
            check_text(body, "form")
        return body


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
