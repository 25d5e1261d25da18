"""Publishing the best step of a release to Civitai, through the site's own upload API.

Civitai's site takes an API key as a Bearer token. The flow: a model (``model.upsert``), a version
(``modelVersion.upsert``), the LoRA file through the multipart upload (``/api/upload``, a PUT per
part, ``/api/upload/complete``) registered with ``modelFile.create``, a post with the previews
(``post.create``; ``/api/v1/image-upload`` then ``post.addImage`` each, with its nsfw level), then
``model.publish``. Every id obtained is saved at once in a state file next to the release, so a
publish that stops halfway resumes without creating or uploading anything twice.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lorafactory.errors import ConfigError
from lorafactory.progress import Progress
from lorafactory.release.remote import Service, call_with_retries
from lorafactory.workspace import write_json_atomic

TOKEN_ENV = "CIVITAI_API_KEY"
BASE_MODELS = {"sd1": "SD 1.5", "sdxl": "SDXL 1.0"}
# WD14's rating tag -> Civitai's nsfw level
NSFW_LEVELS = {"general": "None", "sensitive": "Soft", "questionable": "Mature", "explicit": "X"}
CIVITAI = Service("Civitai", "API key", TOKEN_ENV, "lorafactory publish --to civitai")


@dataclass
class CivitaiPlan:
    """What a publish does: the model, one version for the best step, its file and previews."""

    name: str
    description: str
    tags: list[str]
    version: str
    base_model: str
    trained_words: list[str]
    clip_skip: int
    steps: int
    lora_file: Path
    previews: list[tuple[Path, str, dict]]  # (image, nsfw level, generation metadata)


@dataclass
class CivitaiReport:
    model_url: str
    done: list[str] = field(default_factory=list)  # operations carried out by this call
    skipped: list[str] = field(default_factory=list)  # operations a previous call had already done
    dry_run: bool = False

    @property
    def outcome(self) -> str:
        """One line: what was done, or the heading of a dry run's steps."""
        if self.dry_run:
            return "Civitai steps:"
        return f"{self.model_url}: {len(self.done)} steps done, {len(self.skipped)} already done"

    @property
    def listing(self) -> list[str]:
        """A dry run's steps, one per line."""
        return self.done


class CivitaiClient:
    """Thin httpx client for the few calls the upload needs; retries transient failures."""

    def __init__(self, base_url: str, token: str, client=None) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.http = client or httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=True)
        self.auth = {"Authorization": f"Bearer {token}"}

    def _send(self, method: str, url: str, what: str, **kwargs):
        import httpx

        def attempt():
            response = self.http.request(method, url, **kwargs)
            response.raise_for_status()
            return response

        return call_with_retries(CIVITAI, what, attempt, (httpx.HTTPStatusError, httpx.TransportError))

    def call(self, procedure: str, payload: dict, what: str) -> dict:
        """A site procedure (tRPC over HTTP, superjson envelope): ``{"json": input}`` -> ``result.data.json``."""
        response = self._send(
            "POST", f"{self.base_url}/api/trpc/{procedure}", what, json={"json": payload}, headers=self.auth
        )
        return response.json()["result"]["data"]["json"]

    def post(self, path: str, payload: dict | None, what: str):
        return self._send("POST", f"{self.base_url}{path}", what, json=payload, headers=self.auth).json()

    def put(self, url: str, data: bytes, what: str, content_type: str = "application/octet-stream"):
        return self._send("PUT", url, what, content=data, headers={"Content-Type": content_type})


def _upload_file(client: CivitaiClient, path: Path, what: str) -> str:
    """Multipart upload of a model file; returns its storage URL."""
    size = path.stat().st_size
    grant = client.post(
        "/api/upload", {"filename": path.name, "type": "Model", "size": size}, f"start uploading {what}"
    )
    parts = []
    with path.open("rb") as handle:
        for part in sorted(grant["urls"], key=lambda p: p["partNumber"]):
            chunk = handle.read(math.ceil(size / len(grant["urls"])))  # the server chose the number of parts
            response = client.put(part["url"], chunk, f"upload part {part['partNumber']} of {what}")
            parts.append({"ETag": response.headers.get("ETag", ""), "PartNumber": part["partNumber"]})
    complete = {
        "bucket": grant["bucket"],
        "key": grant["key"],
        "type": "Model",
        "uploadId": grant["uploadId"],
        "parts": parts,
    }
    return client.post("/api/upload/complete", complete, f"finish uploading {what}")


def publish_to_civitai(
    plan: CivitaiPlan,
    state_file: Path,
    release_key: str,
    *,
    base_url: str,
    progress: Progress,
    dry_run: bool = False,
    client=None,
) -> CivitaiReport:
    """Carry out ``plan``, skipping every operation the state file records as done.

    The model is the character's (one per state file); everything else belongs to the release
    identified by ``release_key``, so a new release becomes a new version of the same model."""
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if dry_run:
        steps = (
            ["create model", "create version", f"upload {plan.lora_file.name}"]
            + [f"add preview {p.name}" for p, _, _ in plan.previews]
            + ["publish"]
        )
        return CivitaiReport(f"{base_url}/models/{state.get('model_id', '(new)')}", done=steps, dry_run=True)
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise ConfigError(f"publishing to Civitai needs an API key: set {TOKEN_ENV}, or use --dry-run")
    api = CivitaiClient(base_url, token, client)
    report = CivitaiReport("")

    def once(key: str, label: str, action):
        key = key if key == "model_id" else f"{release_key}/{key}"
        if key in state:
            report.skipped.append(label)
            return state[key]
        state[key] = action()
        write_json_atomic(state_file, state)
        report.done.append(label)
        return state[key]

    total = 4 + len(plan.previews)
    with progress.task("publishing to Civitai", total=total) as task:
        model_id = once(
            "model_id",
            "create model",
            lambda: api.call(
                "model.upsert",
                {
                    "name": plan.name,
                    "description": plan.description,
                    "type": "LORA",
                    "uploadType": "Created",
                    "status": "Draft",
                    "tagsOnModels": [{"name": tag} for tag in plan.tags],
                    "poi": False,
                    "nsfw": False,
                },
                "create the model",
            )["id"],
        )
        task.advance()
        version_id = once(
            "version_id",
            "create version",
            lambda: api.call(
                "modelVersion.upsert",
                {
                    "modelId": model_id,
                    "name": plan.version,
                    "baseModel": plan.base_model,
                    "trainedWords": plan.trained_words,
                    "clipSkip": plan.clip_skip,
                    "steps": plan.steps,
                    "description": plan.description,
                },
                "create the model version",
            )["id"],
        )
        task.advance()
        file_url = once(
            "file_url", f"upload {plan.lora_file.name}", lambda: _upload_file(api, plan.lora_file, plan.lora_file.name)
        )
        once(
            "file_id",
            f"register {plan.lora_file.name}",
            lambda: api.call(
                "modelFile.create",
                {
                    "name": plan.lora_file.name,
                    "url": file_url,
                    "sizeKB": plan.lora_file.stat().st_size / 1024,
                    "type": "Model",
                    "modelVersionId": version_id,
                    "metadata": {"format": "SafeTensor", "fp": "fp32", "size": "full"},
                },
                "register the LoRA file",
            )["id"],
        )
        task.advance()
        post_id = once(
            "post_id",
            "create preview post",
            lambda: api.call("post.create", {"modelVersionId": version_id}, "create the preview post")["id"],
        )
        for index, (image_path, level, meta) in enumerate(plan.previews):
            once(
                f"image:{image_path.name}",
                f"add preview {image_path.name}",
                lambda: _add_image(api, post_id, version_id, index, image_path, level, meta),
            )
            task.advance()
        once("published", "publish", lambda: _publish(api, model_id, version_id))
        task.advance()
    report.model_url = f"{base_url.rstrip('/')}/models/{model_id}"
    return report


def _publish(api: CivitaiClient, model_id: int, version_id: int) -> bool:
    api.call("model.publish", {"id": model_id, "versionIds": [version_id]}, "publish the model")
    return True


def _add_image(
    api: CivitaiClient, post_id: int, version_id: int, index: int, path: Path, level: str, meta: dict
) -> int:
    grant = api.post("/api/v1/image-upload", None, f"start uploading {path.name}")
    api.put(grant["uploadURL"], path.read_bytes(), f"upload {path.name}", "image/png")
    with Image.open(path) as image:
        width, height = image.size
    payload = {
        "postId": post_id,
        "modelVersionId": version_id,
        "url": grant["id"],
        "name": path.name,
        "width": width,
        "height": height,
        "index": index,
        "mimeType": "image/png",
        "meta": meta,
        "nsfw": level,
    }
    return api.call("post.addImage", payload, f"add {path.name} to the post")["id"]
