"""A loopback stand-in for the parts of Civitai's site API that a LoRA upload uses.

Site procedures under ``/api/trpc/<name>`` (superjson envelope), the multipart model upload
(``/api/upload``, part PUTs that answer with an ETag, ``/api/upload/complete``) and the image
upload (``/api/v1/image-upload`` then a PUT). It checks the Bearer key, validates what each call
refers to (a file registered must have been uploaded completely, an image added must exist),
counts everything created, and can fail chosen calls.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

from lorafactory.testing.loopback import LoopbackServer, json_handler

PART_BYTES = 16 * 1024  # the fake splits uploads into parts of this size, to exercise multipart


@dataclass
class FakeCivitai(LoopbackServer):
    tokens: set[str]
    models: dict[int, dict] = field(default_factory=dict)
    versions: dict[int, dict] = field(default_factory=dict)
    files: dict[int, dict] = field(default_factory=dict)
    posts: dict[int, dict] = field(default_factory=dict)
    images: dict[int, dict] = field(default_factory=dict)
    objects: dict[str, bytes] = field(default_factory=dict)  # completed uploads by URL
    image_blobs: dict[str, bytes] = field(default_factory=dict)
    faults: dict[str, list[int]] = field(
        default_factory=dict
    )  # call name -> statuses for its next calls (0 = let it through)
    requests: list[str] = field(default_factory=list)
    _parts: dict[str, dict[int, bytes]] = field(default_factory=dict)
    _uploads: dict[str, str] = field(default_factory=dict)  # upload id -> key
    _server: ThreadingHTTPServer | None = None

    def _next_id(self, table: dict) -> int:
        return max(table, default=100) + 1

    # --- the API ----------------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: dict[str, str], body: bytes, token: str | None
    ) -> tuple[int, object, dict]:
        self.requests.append(f"{method} {path}")
        name = path.removeprefix("/api/trpc/") if path.startswith("/api/trpc/") else path
        status = self.faults[name].pop(0) if self.faults.get(name) else 0
        if status:
            return status, {"error": "injected failure"}, {}
        if method == "PUT" and path.startswith("/s3/"):  # presigned: no Bearer
            etag = hashlib.md5(body).hexdigest()
            self._parts.setdefault(query["uploadId"], {})[int(query["partNumber"])] = body
            return 200, "", {"ETag": f'"{etag}"'}
        if method == "PUT" and path.startswith("/img/"):
            self.image_blobs[path.removeprefix("/img/")] = body
            return 200, "", {}
        if token not in self.tokens:
            return 401, {"error": "Unauthorized"}, {}
        payload = json.loads(body) if body else None
        if path == "/api/upload":
            key = f"Model/1/{payload['filename']}"
            upload_id = uuid.uuid4().hex
            self._uploads[upload_id] = key
            count = max(1, -(-int(payload["size"]) // PART_BYTES))
            urls = [
                {"url": f"{self.url}/s3/{key}?partNumber={i}&uploadId={upload_id}", "partNumber": i}
                for i in range(1, count + 1)
            ]
            return 200, {"urls": urls, "bucket": "fake-bucket", "key": key, "uploadId": upload_id}, {}
        if path == "/api/upload/complete":
            parts = self._parts.get(payload["uploadId"], {})
            expected = [p["PartNumber"] for p in payload["parts"]]
            if sorted(parts) != expected or any(
                f'"{hashlib.md5(parts[p["PartNumber"]]).hexdigest()}"' != p["ETag"] for p in payload["parts"]
            ):
                return 422, {"error": "Upload parts invalid or incomplete — please re-upload"}, {}
            location = f"{self.url}/files/{payload['key']}"
            self.objects[location] = b"".join(parts[n] for n in sorted(parts))
            return 200, location, {}
        if path == "/api/v1/image-upload":
            image_id = str(uuid.uuid4())
            return 200, {"id": image_id, "uploadURL": f"{self.url}/img/{image_id}"}, {}
        if path.startswith("/api/trpc/"):
            status, result = self._procedure(name, payload["json"])
            return status, ({"result": {"data": {"json": result}}} if status == 200 else result), {}
        return 404, {"error": "not found"}, {}

    def _procedure(self, name: str, data: dict) -> tuple[int, dict]:
        if name == "model.upsert":
            model_id = data.get("id") or self._next_id(self.models)
            self.models[model_id] = {**self.models.get(model_id, {}), **data, "id": model_id, "published": False}
            return 200, {"id": model_id}
        if name == "modelVersion.upsert":
            if data["modelId"] not in self.models:
                return 404, {"error": "model not found"}
            version_id = data.get("id") or self._next_id(self.versions)
            self.versions[version_id] = {**data, "id": version_id}
            return 200, {"id": version_id}
        if name == "modelFile.create":
            if data["url"] not in self.objects or data["modelVersionId"] not in self.versions:
                return 400, {"error": "the file was not uploaded, or the version does not exist"}
            file_id = self._next_id(self.files)
            self.files[file_id] = {**data, "id": file_id}
            return 200, {"id": file_id}
        if name == "post.create":
            post_id = self._next_id(self.posts)
            self.posts[post_id] = {**data, "id": post_id}
            return 200, {"id": post_id}
        if name == "post.addImage":
            if data["url"] not in self.image_blobs or data["postId"] not in self.posts:
                return 400, {"error": "the image was not uploaded, or the post does not exist"}
            image_id = self._next_id(self.images)
            self.images[image_id] = {**data, "id": image_id}
            return 200, {"id": image_id}
        if name == "model.publish":
            self.models[data["id"]]["published"] = True
            return 200, {"id": data["id"]}
        return 404, {"error": f"no procedure {name}"}

    # --- the server --------------------------------------------------------------------

    def start(self) -> FakeCivitai:
        self._serve(json_handler(self.handle))
        return self
