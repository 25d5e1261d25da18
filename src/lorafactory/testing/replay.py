"""A loopback HTTP server that replays danbooru-style API responses and serves the images."""

from __future__ import annotations

import hashlib
import json
import mimetypes
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from PIL import Image


@dataclass
class ReplayImage:
    path: Path
    general: list[str]
    character: list[str]


@dataclass
class DanbooruReplay:
    """Serves ``/posts.json`` (tag search, ``limit``, ``page``) and ``/data/<file>`` on 127.0.0.1."""

    images: list[ReplayImage]
    requests: list[tuple[float, str]] = field(default_factory=list)
    faults: list[tuple[int, dict[str, str], bytes]] = field(
        default_factory=list, metadata={"doc": "(status, headers, body) answered, in order, before normal replies"}
    )
    data_faults: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)  # the same, for image requests only
    page_cap: int = 1000  # numbered pages beyond this answer 410, as danbooru's do past 1000
    latency_s: float = 0.0  # simulated server time per request
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _posts(self) -> list[dict]:
        posts = []
        for index, item in enumerate(self.images):
            data = item.path.read_bytes()
            with Image.open(item.path) as image:
                width, height = image.size
            general = sorted(item.general)
            posts.append(
                {
                    "id": 7000000 - index,
                    "md5": hashlib.md5(data).hexdigest(),
                    "rating": "g",
                    "score": 10 + index,
                    "image_width": width,
                    "image_height": height,
                    "file_ext": item.path.suffix.lstrip("."),
                    "tag_string": " ".join(sorted(general + item.character)),
                    "tag_string_general": " ".join(general),
                    "tag_string_character": " ".join(item.character),
                    "tag_string_copyright": "",
                    "tag_string_artist": "",
                    "tag_string_meta": "",
                    "is_deleted": False,
                    "is_banned": False,
                    "file_url": f"{self.url}/data/{item.path.name}",
                    "media_asset": {
                        "variants": [
                            {"type": "original", "url": f"{self.url}/data/{item.path.name}", "width": width, "height": height}
                        ]
                    },
                }
            )
        return posts

    def start(self) -> DanbooruReplay:
        replay = self
        files = {item.path.name: item.path for item in self.images}
        posts_holder: list[list[dict]] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                return

            def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if "Content-Length" not in (headers or {}):  # a fault may announce more than it sends
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                replay.requests.append((time.monotonic(), self.path))
                if replay.latency_s:
                    time.sleep(replay.latency_s)
                queue = replay.data_faults if self.path.startswith("/data/") and replay.data_faults else replay.faults
                if queue:
                    status, headers, body = queue.pop(0)
                    self._send(status, body, headers.pop("Content-Type", "text/html"), headers)
                    return
                parsed = urlparse(self.path)
                if parsed.path == "/posts.json":
                    query = parse_qs(parsed.query)
                    wanted = set(query.get("tags", [""])[0].split())
                    limit = int(query.get("limit", ["20"])[0])
                    page = query.get("page", ["1"])[0]
                    matching = [p for p in posts_holder[0] if wanted <= set(p["tag_string"].split())]
                    if page.startswith("b"):  # keyset: posts below an id, newest first
                        chunk = [p for p in matching if p["id"] < int(page[1:])][:limit]
                    elif int(page) > replay.page_cap:
                        message = f'{{"success": false, "message": "You cannot go beyond page {replay.page_cap}."}}'
                        self._send(410, message.encode(), "application/json")
                        return
                    else:
                        chunk = matching[(int(page) - 1) * limit : int(page) * limit]
                    self._send(200, json.dumps(chunk).encode(), "application/json")
                elif parsed.path.startswith("/data/") and parsed.path[6:] in files:
                    path = files[parsed.path[6:]]
                    self._send(200, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream")
                else:
                    self._send(404, b'{"success": false}', "application/json")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        posts_holder.append(self._posts())
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> DanbooruReplay:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
