"""The server life cycle shared by the test servers: a threaded HTTP server on 127.0.0.1 only."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, unquote, urlparse

# (method, path, query, body, Bearer token) -> (status, JSON payload, extra headers)
JsonAnswer = Callable[[str, str, dict[str, str], bytes, "str | None"], tuple[int, object, dict[str, str]]]


class LoopbackServer:
    """``url``, ``stop()`` and use as a context manager; subclasses build their handler in ``start()``
    and call ``_serve`` with it."""

    _server: ThreadingHTTPServer | None

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):  # pragma: no cover - every server overrides it
        raise NotImplementedError

    def _serve(self, handler: type[BaseHTTPRequestHandler], port: int = 0) -> None:
        """Listen on ``port`` when it is free, else on any free port (0: any free port)."""
        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError:
            if not port:
                raise
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def json_handler(answer: JsonAnswer) -> type[BaseHTTPRequestHandler]:
    """A request handler for GET, POST and PUT that replies with ``answer``'s JSON."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            return

        def _answer(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            auth = self.headers.get("Authorization", "")
            parsed = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(parsed.query).items()}
            status, payload, headers = answer(
                method,
                unquote(parsed.path),
                query,
                body,
                auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None,
            )
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._answer("PUT")

    return Handler
