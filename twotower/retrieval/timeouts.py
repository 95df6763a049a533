"""Request-read timeouts for ``twotower serve``: a client must send its headers, then its body, within
``--read-timeout`` seconds each, or it gets 408 and its connection is closed.

uvicorn times out only idle keep-alive connections; a client that opens a connection and sends half its headers,
or a ``Content-Length`` larger than the body it sends, would hold the connection (and a ``--max-connections``
slot) for ever. Two pieces close that:

- :class:`TimedH11Protocol`, uvicorn's h11 protocol with a timer from the moment a request is awaited (the
  connection opens, or the previous response is sent) until its headers are parsed;
- :class:`ReadTimeout`, an ASGI middleware whose ``receive`` waits at most the timeout for each body chunk.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol


def timeout_body(timeout: float, what: str) -> dict[str, Any]:
    """The JSON body of a 408, in the server's error shape (``detail`` list + one ``error`` line)."""
    msg = f"the request's {what} did not arrive within read_timeout {timeout:g} s; the connection is closed"
    return {"detail": [{"loc": [what], "msg": msg, "type": "timeout"}], "error": f"{what}: {msg}"}


class BodyTimeout(HTTPException):
    """A body chunk did not arrive in time (an HTTPException: FastAPI re-raises those while reading a body)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(408, timeout_body(timeout, "body")["error"], headers={"connection": "close"})
        self.timeout = timeout


class ReadTimeout:
    """ASGI middleware: every ``http.request`` message (a body chunk) must come within ``timeout`` seconds."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def timed_receive() -> dict[str, Any]:
            try:
                return await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout) from None

        await self.app(scope, timed_receive, send)


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout: ``read_timeout`` seconds from the moment a request is
    awaited until its headers are complete; then 408 and the connection is closed. Pass
    ``TimedH11Protocol.with_timeout(s)`` as uvicorn's ``http``."""

    read_timeout = 10.0

    @classmethod
    def with_timeout(cls, seconds: float) -> type[TimedH11Protocol]:
        return type(cls.__name__, (cls,), {"read_timeout": float(seconds)})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.read_timeout, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if not self._awaiting_headers():
            self._disarm()  # a request is being served: the body has its own timeout (ReadTimeout)
        elif self.conn.trailing_data[0]:
            self._arm()  # part of the next request's headers is here: it must be complete in time

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request (keep-alive): idle time is uvicorn's --keep-alive, partial headers ours

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._awaiting_headers():
            return
        if not self.conn.trailing_data[0] and self.timeout_keep_alive_task is not None:
            return  # an idle keep-alive connection between requests: uvicorn's --keep-alive timer closes it
        body = json.dumps(timeout_body(self.read_timeout, "headers")).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()
