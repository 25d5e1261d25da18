"""Loopback HTTP servers that replay image-site APIs and serve the images.

Each replay answers its site's search endpoint in the site's own JSON shape (with its paging
rules and caps) and serves the files under ``/data/``. Every request is logged with its time,
so tests can check rate limits; ``faults`` and ``data_faults`` inject error replies.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import mimetypes
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote_plus, unquote_plus, urlparse

from PIL import Image

from lorafactory.testing.loopback import LoopbackServer

Reply = tuple[int, bytes]


@dataclass
class ReplayImage:
    path: Path
    general: list[str]
    character: list[str]


@dataclass
class _Post:
    id: int
    md5: str
    width: int
    height: int
    tags: list[str]
    image: ReplayImage


@dataclass
class Replay(LoopbackServer):
    """The server machinery; subclasses answer their site's API in ``api()``."""

    images: list[ReplayImage]
    requests: list[tuple[float, str]] = field(default_factory=list)
    faults: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)  # (status, headers, body), in order
    data_faults: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)  # the same, image requests only
    page_cap: int = 1000  # numbered pages beyond this are refused, as real sites refuse deep paging
    latency_s: float = 0.0  # simulated server time per request
    agents: list[str] = field(default_factory=list)  # User-Agent of each API request
    authorizations: list[str] = field(default_factory=list)  # Authorization header of each API request
    file_urls: str = "absolute"  # or "relative" (/data/x) or "protocol-relative" (//host/data/x), as some boorus
    port: int = 0  # the port to listen on when it is free (0: any free port)
    _server: ThreadingHTTPServer | None = None

    def _index(self) -> list[_Post]:
        posts = []
        for index, item in enumerate(self.images):
            with Image.open(item.path) as image:
                width, height = image.size
            md5 = hashlib.md5(item.path.read_bytes()).hexdigest()
            posts.append(_Post(7000000 - index, md5, width, height, sorted(item.general + item.character), item))
        return posts

    def file_url(self, post: _Post) -> str:
        path = f"/data/{post.image.path.name}"
        if self.file_urls == "relative":
            return path
        return (self.url.split(":", 1)[1] if self.file_urls == "protocol-relative" else self.url) + path

    def matching(self, wanted: set[str]) -> list[_Post]:
        """Posts carrying every wanted tag; ``id:<N`` filters by id, as the sites' search syntax does."""
        below = next((int(tag[4:]) for tag in wanted if tag.startswith("id:<")), None)
        plain = {tag for tag in wanted if not tag.startswith("id:<")}
        return [p for p in self.posts if plain <= set(p.tags) and (below is None or p.id < below)]

    def character_counts(self) -> dict[str, int]:
        """Character tag -> number of posts, for the sites' tag-lookup endpoints."""
        counts: dict[str, int] = {}
        for post in self.posts:
            for tag in post.image.character:
                counts[tag] = counts.get(tag, 0) + 1
        return counts

    def api(self, path: str, query: dict[str, str]) -> Reply:  # pragma: no cover - every replay overrides it
        raise NotImplementedError

    def api_post(self, path: str, form: dict[str, str]) -> Reply:
        return 404, b"{}"

    def start(self) -> Replay:
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                return

            def _send(
                self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
            ) -> None:
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
                    headers = dict(headers)
                    self._send(status, body, headers.pop("Content-Type", "text/html"), headers)
                    return
                parsed = urlparse(self.path)
                if parsed.path.startswith("/data/") and parsed.path[6:] in files:
                    path = files[parsed.path[6:]]
                    self._send(
                        200, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                    )
                    return
                replay.agents.append(self.headers.get("User-Agent", ""))
                replay.authorizations.append(self.headers.get("Authorization", ""))
                status, body = replay.api(
                    parsed.path, {k: v[0] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
                )
                if 300 <= status < 400:  # the body names the new path; the query is kept
                    self._send(status, b"", "text/plain", {"Location": f"/{body.decode()}?{parsed.query}"})
                    return
                self._send(status, body, "application/json")

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                replay.requests.append((time.monotonic(), "POST " + self.path))
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
                if "json" in self.headers.get("Content-Type", ""):
                    form = json.loads(raw or "{}")
                else:
                    form = {k: v[0] for k, v in parse_qs(raw).items()}
                status, body = replay.api_post(urlparse(self.path).path, form)
                self._send(status, body, "application/json")

        files = {item.path.name: item.path for item in self.images}
        self.posts = self._index()
        self._serve(Handler, self.port)
        return self


def _json(data: object) -> Reply:
    return 200, json.dumps(data).encode()


class DanbooruReplay(Replay):
    """``/posts.json`` with ``tags``, ``limit`` and ``page`` (numbers, or ``b<id>`` keyset); 410 past the cap.
    Also ``/autocomplete.json``, ``/wiki_pages.json`` (``other_names``: tag -> names) and ``/tags.json``
    (``search[name_comma]`` or ``search[name_matches]`` with ``*``, ``search[category]``, ``search[order]=count``,
    ``limit``) over the character tags of the posts."""

    other_names: dict[str, list[str]] = {}

    def _tags(self, query: dict[str, str]) -> list[dict]:
        tags = [{"name": t, "post_count": n, "category": 4} for t, n in self.character_counts().items()]
        if "search[name_comma]" in query:
            tags = [t for t in tags if t["name"] in query["search[name_comma]"].split(",")]
        if "search[name_matches]" in query:
            pattern = query["search[name_matches]"].replace("[", "[[]")  # Danbooru's only wildcard is *
            tags = [t for t in tags if fnmatch.fnmatchcase(t["name"], pattern.replace("?", "[?]"))]
        if query.get("search[category]", "4") != "4":
            tags = []
        if query.get("search[order]") == "count":
            tags.sort(key=lambda t: -t["post_count"])
        return tags[: int(query.get("limit", "20"))]

    def api(self, path: str, query: dict[str, str]) -> Reply:
        if path == "/autocomplete.json":
            prefix = query.get("search[query]", "").rstrip("*")
            found = [
                {
                    "type": "tag",
                    "label": tag.replace("_", " "),
                    "value": tag,
                    "category": 4,
                    "post_count": count,
                    "antecedent": None,
                }
                for tag, count in self.character_counts().items()
                if tag.startswith(prefix)
            ]
            return _json(sorted(found, key=lambda t: -t["post_count"])[:10])
        if path == "/wiki_pages.json":
            name = query.get("search[other_names_match]", "")
            return _json(
                [{"title": tag, "other_names": names} for tag, names in self.other_names.items() if name in names]
            )
        if path == "/tags.json":
            return _json(self._tags(query))
        if path != "/posts.json":
            return 404, b'{"success": false}'
        limit, page = int(query.get("limit", "20")), query.get("page", "1")
        matching = self.matching(set(query.get("tags", "").split()))
        if page.startswith("b"):
            chunk = [p for p in matching if p.id < int(page[1:])][:limit]
        elif int(page) > self.page_cap:
            return 410, json.dumps(
                {"success": False, "message": f"You cannot go beyond page {self.page_cap}."}
            ).encode()
        else:
            chunk = matching[(int(page) - 1) * limit : int(page) * limit]
        general = lambda p: sorted(p.image.general)  # noqa: E731
        return _json(
            [
                {
                    "id": p.id,
                    "md5": p.md5,
                    "rating": "g",
                    "score": 10,
                    "image_width": p.width,
                    "image_height": p.height,
                    "file_ext": p.image.path.suffix.lstrip("."),
                    "tag_string": " ".join(p.tags),
                    "tag_string_general": " ".join(general(p)),
                    "tag_string_character": " ".join(p.image.character),
                    "tag_string_copyright": "",
                    "tag_string_artist": "",
                    "tag_string_meta": "",
                    "is_deleted": False,
                    "is_banned": False,
                    "file_url": self.file_url(p),
                    "media_asset": {
                        "variants": [
                            {"type": "original", "url": self.file_url(p), "width": p.width, "height": p.height}
                        ]
                    },
                }
                for p in chunk
            ]
        )


class GelbooruReplay(Replay):
    """``/index.php?page=dapi&s=post&q=index&json=1`` with ``pid`` paging; ``{"@attributes", "post"}``,
    and no ``post`` key on an empty page. ``credentials`` = (user_id, api_key) makes them required (401)."""

    credentials: tuple[str, str] | None = None

    def api(self, path: str, query: dict[str, str]) -> Reply:
        if path != "/index.php" or query.get("page") != "dapi":
            return 404, b"{}"
        if self.credentials and (query.get("user_id"), query.get("api_key")) != self.credentials:
            return 401, b'{"success": false, "message": "Missing authentication"}'
        if query.get("s") == "tag":
            needle = query.get("name_pattern", "").strip("%")
            tags = [
                {"id": i, "name": t, "count": n, "type": 4, "ambiguous": 0}
                for i, (t, n) in enumerate(self.character_counts().items())
                if needle in t
            ]
            return _json(
                {"@attributes": {"limit": 100, "offset": 0, "count": len(tags)}, **({"tag": tags} if tags else {})}
            )
        limit, pid = int(query.get("limit", "100")), int(query.get("pid", "0"))
        if pid * limit >= self.page_cap * limit:
            return _json({"@attributes": {"limit": limit, "offset": pid * limit, "count": 0}})
        matching = self.matching(set(query.get("tags", "").split()))
        chunk = matching[pid * limit : (pid + 1) * limit]
        body: dict = {"@attributes": {"limit": limit, "offset": pid * limit, "count": len(matching)}}
        if chunk:
            body["post"] = [
                {
                    "id": p.id,
                    "md5": p.md5,
                    "width": p.width,
                    "height": p.height,
                    "score": 3,
                    "rating": "general",
                    "tags": " ".join(p.tags),
                    "file_url": self.file_url(p),
                    "sample_url": "",
                    "sample_width": 0,
                    "sample_height": 0,
                    "status": "active",
                }
                for p in chunk
            ]
        return _json(body)


class MoebooruReplay(Replay):
    """``/post.json`` with ``tags``, ``limit``, ``page`` (yande.re, konachan); an empty list past the cap."""

    def api(self, path: str, query: dict[str, str]) -> Reply:
        if path == "/tag.json":
            needle = query.get("name", "")
            tags = [
                {"id": i, "name": t, "count": n, "type": 4, "ambiguous": False}
                for i, (t, n) in enumerate(self.character_counts().items())
                if needle in t
            ]
            return _json(sorted(tags, key=lambda t: -t["count"]))
        if path != "/post.json":
            return 404, b"[]"
        limit, page = int(query.get("limit", "100")), int(query.get("page", "1"))
        if page > self.page_cap:
            return _json([])
        matching = self.matching(set(query.get("tags", "").split()))
        return _json(
            [
                {
                    "id": p.id,
                    "md5": p.md5,
                    "tags": " ".join(p.tags),
                    "rating": "s",
                    "score": 5,
                    "width": p.width,
                    "height": p.height,
                    "file_url": self.file_url(p),
                    "file_ext": p.image.path.suffix.lstrip("."),
                    "sample_url": self.file_url(p),
                    "sample_width": p.width,
                    "sample_height": p.height,
                    "jpeg_url": self.file_url(p),
                    "jpeg_width": p.width,
                    "jpeg_height": p.height,
                    "status": "active",
                }
                for p in matching[(page - 1) * limit : page * limit]
            ]
        )


class ZerochanReplay(Replay):
    """``/<Tag+Name>?json&p=&l=`` lists with ``next``, ``/<id>?json`` items; ``aliases`` redirect
    (301) to the canonical tag; every JSON reply carries a raw control character, as Zerochan's
    sometimes do; the User-Agent of each request is kept in ``agents``."""

    aliases: dict[str, str] = {}

    def api(self, path: str, query: dict[str, str]) -> Reply:
        name = unquote_plus(path.lstrip("/"))
        if name in self.aliases:
            return 301, quote_plus(self.aliases[name]).encode()
        if name.isdigit():
            post = next((p for p in self.posts if p.id == int(name)), None)
            if post is None:
                return 404, b"{}"
            return _raw_control(
                {
                    "id": post.id,
                    "small": "",
                    "medium": "",
                    "large": "",
                    "full": self.file_url(post),
                    "width": post.width,
                    "height": post.height,
                    "hash": post.md5,
                    "tags": post.tags,
                }
            )
        tags = set(name.split(","))
        matching = [p for p in self.posts if tags <= set(p.image.character)]
        if not matching:
            return 404, b"{}"
        limit, page = int(query.get("l", "20")), int(query.get("p", "1"))
        chunk = matching[(page - 1) * limit : page * limit]
        items = [
            {"id": p.id, "width": p.width, "height": p.height, "md5": p.md5, "tag": name, "tags": p.tags}
            for p in chunk
        ]
        return _raw_control({"items": items, "next": page * limit < len(matching)})


def _raw_control(data: object) -> Reply:
    """JSON with a raw control byte between a key and its colon: invalid unless stripped."""
    return 200, json.dumps(data).encode().replace(b'"tags":', b'"tags"\x01:', 1)


class AnimePicturesReplay(Replay):
    """``/api/v3/posts`` (``page`` from 0, ``max_pages``), ``/api/v3/posts/<id>`` details and
    ``/pictures/download_image/<file>``; ``search_tag`` joins tags with ``&&``."""

    def api(self, path: str, query: dict[str, str]) -> Reply:
        per_page = 4
        if path.startswith("/pictures/download_image/"):
            name = unquote_plus(path.rsplit("/", 1)[-1])
            post = next((p for p in self.posts if p.image.path.name == name), None)
            return (404, b"") if post is None else (200, post.image.path.read_bytes())
        if path.startswith("/api/v3/posts/"):
            post = next((p for p in self.posts if p.id == int(path.rsplit("/", 1)[-1])), None)
            if post is None:
                return 404, b"{}"
            return _json(
                {
                    "post": {"id": post.id},
                    "tags": [{"tag": {"tag": t.replace("_", " ")}} for t in post.tags],
                    "file_url": post.image.path.name,
                }
            )
        if path == "/api/v3/tags":
            needle = query.get("tag:smart_like", "").replace(" ", "_")
            found = [
                {"id": i, "tag": t.replace("_", " "), "num": n, "type": 1}
                for i, (t, n) in enumerate(self.character_counts().items())
                if needle in t
            ]
            return _json({"tags": found})
        if path != "/api/v3/posts":
            return 404, b"{}"
        wanted = {t.replace(" ", "_") for t in query.get("search_tag", "").split("&&") if t}
        matching = self.matching(wanted)
        page = int(query.get("page", "0"))
        chunk = matching[page * per_page : (page + 1) * per_page]
        posts = [
            {
                "id": p.id,
                "md5": p.md5,
                "ext": p.image.path.suffix,
                "width": p.width,
                "height": p.height,
                "erotics": 0,
                "score_number": 3,
            }
            for p in chunk
        ]
        return _json(
            {
                "posts": posts,
                "page_number": page,
                "posts_count": len(matching),
                "max_pages": -(-len(matching) // per_page),
            }
        )


class SankakuReplay(Replay):
    """``/v2/posts/keyset`` with a ``next`` cursor; string ids; typed tags (4 = character). File links
    listed in ``expired`` redirect to ``/expired.png``, as Sankaku's signed links do once stale."""

    expired: set[str] = set()
    contentious: set[str] = set()  # file names whose links only a logged-in client gets
    login = ("me", "pw")
    token = "sankaku-token"

    def api_post(self, path: str, form: dict[str, str]) -> Reply:
        if path == "/auth/token" and (form.get("login"), form.get("password")) == self.login:
            return _json({"success": True, "access_token": self.token, "token_type": "Bearer"})
        return 401, b'{"success": false, "code": "invalid-credentials"}'

    def api(self, path: str, query: dict[str, str]) -> Reply:
        if path == "/expired.png":
            return 200, b"\x89PNG\r\n\x1a\n the placeholder for stale links"
        if path.startswith("/files/"):
            name = path.rsplit("/", 1)[-1]
            if name in self.expired:
                return 302, b"expired.png"
            post = next((p for p in self.posts if p.image.path.name == name), None)
            return (404, b"") if post is None else (200, post.image.path.read_bytes())
        if path == "/tags":
            prefix = query.get("name", "").rstrip("*")
            return _json(
                [
                    {"id": i, "name": t, "post_count": n, "type": 4}
                    for i, (t, n) in enumerate(self.character_counts().items())
                    if t.startswith(prefix)
                ]
            )
        if path != "/v2/posts/keyset":
            return 404, b"{}"
        logged_in = self.authorizations[-1] == f"Bearer {self.token}"
        matching = self.matching(set(query.get("tags", "").split()))
        start = int(query["next"], 16) if query.get("next") else 0
        limit = int(query.get("limit", "40"))
        chunk = matching[start : start + limit]
        data = [
            {
                "id": f"s{p.id:x}",
                "md5": p.md5,
                "rating": "s",
                "width": p.width,
                "height": p.height,
                "total_score": 4,
                "file_url": ""
                if p.image.path.name in self.contentious and not logged_in
                else f"{self.url}/files/{p.image.path.name}?e=1&m=sig",
                "sample_url": "",
                "sample_width": 0,
                "sample_height": 0,
                "tags": [{"name": t, "type": 4 if t in p.image.character else 0} for t in p.tags],
            }
            for p in chunk
        ]
        more = start + limit < len(matching)
        return _json({"meta": {"next": f"{start + limit:x}" if more else None, "prev": None}, "data": data})


class PixivReplay(Replay):
    """The App API: ``POST /auth/token`` (refresh token -> access token), ``/v1/search/illust`` with
    ``offset`` (refused past ``max_offset``) and ``end_date``, 3 works a page, ``next_url``."""

    refresh_token = "refresh-me"
    access_token = "access-granted"
    max_offset = 5000
    per_page = 3

    def api_post(self, path: str, form: dict[str, str]) -> Reply:
        if path != "/auth/token" or form.get("refresh_token") != self.refresh_token:
            return 400, b'{"has_error": true}'
        return _json({"access_token": self.access_token, "expires_in": 3600, "refresh_token": self.refresh_token})

    def api(self, path: str, query: dict[str, str]) -> Reply:
        if path.startswith("/img/"):
            post = next((p for p in self.posts if p.image.path.name == path.rsplit("/", 1)[-1]), None)
            return (404, b"") if post is None else (200, post.image.path.read_bytes())
        if path != "/v1/search/illust" or self.authorizations[-1] != f"Bearer {self.access_token}":
            return 400, b'{"error": {"message": "Error occurred at the OAuth process."}}'
        offset = int(query.get("offset", "0"))
        if offset > self.max_offset:
            return 400, b'{"error": {"message": "offset must be no more than the limit"}}'
        words = set(query.get("word", "").split())
        dated = [(p, f"2024-01-{28 - i % 28:02d}T00:00:00+09:00") for i, p in enumerate(self.posts)]
        matching = [
            (p, d) for p, d in dated if words <= set(p.image.character) and d[:10] <= query.get("end_date", "9999")
        ]
        chunk = matching[offset : offset + self.per_page]
        works = [
            {
                "id": p.id,
                "type": "illust",
                "width": p.width,
                "height": p.height,
                "create_date": d,
                "x_restrict": 0,
                "total_bookmarks": 7,
                "tags": [{"name": t} for t in p.tags],
                "meta_single_page": {"original_image_url": f"{self.url}/img/{p.image.path.name}"},
            }
            for p, d in chunk
        ]
        more = offset + self.per_page < len(matching)
        return _json(
            {
                "illusts": works,
                "next_url": f"{self.url}/v1/search/illust?offset={offset + self.per_page}" if more else None,
            }
        )
