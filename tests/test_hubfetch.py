"""A model the Hugging Face Hub did not give is named in one line with the fix, whichever library fetched it:
huggingface_hub itself (as imgutils calls it), diffusers, transformers; offline, unreachable, or refused."""

import http.server
import logging
import re
import subprocess
import sys
import threading

import pytest
import torch

from lorafactory.demo import offline_env
from lorafactory.errors import LorafactoryError, StageError
from lorafactory.fleet.worker import PERMANENT
from lorafactory.hubfetch import HubRefused, HubUnavailable, hub_failure
from lorafactory.state import Store
from lorafactory.workspace import Workspace

CACHE_FIX = "or copy a cache that holds it there (HF_HUB_CACHE)"


def _raised(call) -> BaseException:
    with pytest.raises(Exception) as info:
        call()
    return info.value


def test_models_missing_from_the_cache_while_offline_are_named():
    """The tests run with HF_HUB_OFFLINE=1 on the stand-in cache, which holds none of these."""
    from huggingface_hub import constants, hf_hub_download

    from lorafactory.train.model import load_pipeline
    from lorafactory.vision.clip import Clip

    offline = f"is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set"
    raw = _raised(lambda: hf_hub_download("deepghs/no_such_checker", "mobilenet/model.onnx"))
    assert str(hub_failure(raw)).startswith(f"deepghs/no_such_checker/mobilenet/model.onnx {offline}")
    assert str(hub_failure(raw)).endswith(CACHE_FIX)
    # diffusers and transformers raise their own errors, which name no file: the one raised names the model
    base = _raised(lambda: load_pipeline("someone/not-cached-sd15"))
    assert isinstance(base, StageError) and str(base).startswith(f"someone/not-cached-sd15 {offline}")
    clip = _raised(lambda: Clip("someone/not-cached-clip", torch.device("cpu")))
    assert isinstance(clip, StageError) and str(clip).startswith(f"someone/not-cached-clip {offline}")
    assert hub_failure(ValueError("not the Hub's")) is None and hub_failure(FileNotFoundError(2, "gone")) is None


class _RefusingHub(http.server.BaseHTTPRequestHandler):
    """Answers every request about repository ``<answer>/model`` as the Hub answers that case."""

    ANSWERS = {
        "gated": (403, "GatedRepo"),
        "private": (401, "RepoNotFound"),
        "renamed": (404, "EntryNotFound"),
        "revision": (404, "RevisionNotFound"),
        "unauthorized": (401, None),
        "down": (502, None),
    }

    def do_HEAD(self):
        status, code = next(self.ANSWERS[a] for a in self.ANSWERS if f"/{a}/model" in self.path)  # a file or the API
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


class _SlowHub(http.server.BaseHTTPRequestHandler):
    """Serves any file as the Hub does (its commit and etag in a HEAD's headers), ``SIZE`` bytes in 20 parts over
    about two seconds: a download long enough to be watched (the client writes what came every 10 MiB)."""

    SIZE = 40_000_000

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
        self.send_header("ETag", '"slow-etag"')
        self.send_header("Content-Length", str(self.SIZE))
        self.end_headers()

    def do_GET(self):
        self.do_HEAD()
        part = self.SIZE // 20
        for _ in range(20):
            self.wfile.write(b"\0" * part)
            self.wfile.flush()
            threading.Event().wait(0.1)  # not time.sleep: the fixture skips the client's waits

    def log_message(self, *args):
        pass


def _loopback_hub(monkeypatch, tmp_path, handler):
    """The Hub client online, on an empty cache, a loopback Hub with ``handler`` its endpoint, its retries' waits
    skipped (a refused connection is retried)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    endpoint = f"http://127.0.0.1:{server.server_port}"  # for every library, as HF_ENDPOINT sets it at import
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield endpoint
    server.shutdown()
    server.server_close()


@pytest.fixture
def online(monkeypatch, tmp_path):
    yield from _loopback_hub(monkeypatch, tmp_path, _RefusingHub)


@pytest.fixture
def slow_hub(monkeypatch, tmp_path):
    yield from _loopback_hub(monkeypatch, tmp_path, _SlowHub)


@pytest.mark.parametrize(
    "answer, kind, expected",
    [  # the Hub's own answers are settings to change (never retried by the fleet); a failing Hub is not
        (
            "gated",
            HubRefused,
            "is gated on the Hugging Face Hub: accept its terms at {endpoint}/gated/model, then log in",
        ),
        ("private", HubRefused, "is not on the Hugging Face Hub, or is private: check the model id, or log in"),
        ("renamed", HubRefused, "is not in its repository on the Hugging Face Hub; check the model id"),
        ("revision", HubRefused, ": the Hugging Face Hub has no such revision; check the model id and revision"),
        ("unauthorized", HubRefused, "(Client error '401 Unauthorized'"),
        ("down", HubUnavailable, "and the Hub could not be reached (Server error '502 Bad Gateway'"),
    ],
)
def test_the_hubs_refusals_are_named_with_the_fix(online, answer, kind, expected):
    from huggingface_hub import hf_hub_download

    raw = _raised(lambda: hf_hub_download(f"{answer}/model", "weights/model.onnx", endpoint=online))
    error = hub_failure(raw)
    named = f"{answer}/model/weights/model.onnx"
    assert type(error) is kind and error.exit_code == (2 if kind is HubRefused else 4)  # bad settings; a failure
    assert isinstance(error, PERMANENT) == (kind is HubRefused)  # the fleet retries only the failing Hub
    assert str(error).startswith(f"the Hugging Face Hub refused {named}" if answer == "unauthorized" else named)
    assert expected.format(endpoint=online) in str(error) and "\n" not in str(error)


def test_an_unreachable_hub_is_named(online, tmp_path):
    from huggingface_hub import hf_hub_download

    closed = http.server.HTTPServer(("127.0.0.1", 0), _RefusingHub)
    endpoint = f"http://127.0.0.1:{closed.server_port}"
    closed.server_close()  # nothing listens there now
    raw = _raised(lambda: hf_hub_download("someone/model", "model.onnx", endpoint=endpoint))
    assert str(hub_failure(raw)) == (
        f"someone/model/model.onnx is not in the Hugging Face cache ({tmp_path / 'hub'}) and the Hub could not be "
        "reached ([Errno 111] Connection refused): check the connection (a proxy, HF_ENDPOINT), " + CACHE_FIX
    )


def test_a_prepare_whose_vision_models_are_not_cached_fails_in_one_line_that_names_one(kit, tmp_path):
    """The case met first: a new machine, offline, an empty cache. The prepare stage fails naming the imgutils
    model it could not get, and the state store records the same line."""
    images = tmp_path / "images"
    images.mkdir()
    for png in sorted(kit.images.glob("main_*.png"))[:6]:
        (images / png.name).write_bytes(png.read_bytes())
    env = offline_env(kit) | {"HF_HUB_CACHE": str(tmp_path / "empty-hub"), "COLUMNS": "300"}
    command = [sys.executable, "-m", "lorafactory", "prepare", "Jo", "--from-dir", str(images)]
    command += ["--workspace", str(tmp_path / "ws"), "--preset", "tiny-demo"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: deepghs/") and error.endswith(CACHE_FIX)
    assert f"is not in the Hugging Face cache ({tmp_path / 'empty-hub'}) and HF_HUB_OFFLINE is set" in error
    summary = Store(Workspace(tmp_path / "ws").default_db_url).character_summary("jo")
    stages = summary["latest_run"]["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [("crawl", "succeeded"), ("prepare", "failed")]
    assert "error: " + stages[-1]["error"] == error


def test_a_first_prepare_online_fetches_the_vision_models_and_says_what_came(kit, tmp_path):
    """The same first run online: imgutils lists and downloads its models from the Hub (a loopback one serving the
    stand-in cache), into the empty cache, and the stage ends naming what came."""
    from huggingface_hub.file_download import repo_folder_name

    from lorafactory.testing.cache_hub import CacheHub

    images = tmp_path / "images"
    images.mkdir()
    for png in sorted(kit.images.glob("main_*.png"))[:6]:
        (images / png.name).write_bytes(png.read_bytes())
    with CacheHub(kit.hub) as hub:
        env = offline_env(kit) | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "COLUMNS": "2000"}
        env["HF_HUB_CACHE"] = str(tmp_path / "hub")
        command = [sys.executable, "-m", "lorafactory", "prepare", "Jo", "--from-dir", str(images)]
        command += ["--workspace", str(tmp_path / "ws"), "--preset", "tiny-demo"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (came,) = [line for line in result.stderr.splitlines() if "downloaded into the Hugging Face cache: " in line]
    for repo in ("deepghs/ccip_onnx", "deepghs/anime_person_detection", "SmilingWolf/wd-swinv2-tagger-v3"):
        assert f" {repo} (" in came, came
        folder = repo_folder_name(repo_id=repo, repo_type="model")
        fetched = sorted(p for p in (tmp_path / "hub" / folder / "snapshots").rglob("*") if p.is_file())
        assert fetched and all(  # whole, and as the stand-in cache holds them
            p.read_bytes() == (kit.hub / folder / p.relative_to(tmp_path / "hub" / folder)).read_bytes()
            for p in fetched
        )


def test_a_base_model_not_yet_cached_is_said_to_download_before_it_does(online, caplog, tmp_path):
    """The libraries show no progress while a base model downloads (several GB): the stage says why it waits."""
    from lorafactory.train.model import load_pipeline

    caplog.set_level(logging.INFO, logger="lorafactory")
    failed = _raised(lambda: load_pipeline("down/model"))  # the loopback Hub is down: its answers are 502s
    said = [r.getMessage() for r in caplog.records if r.name == "lorafactory.hubfetch"]
    assert said == [
        f"base model down/model is not in the Hugging Face cache ({tmp_path / 'hub'}) yet: downloading it, once; "
        "this takes a while"
    ]
    assert isinstance(failed, LorafactoryError) and "down/model" in str(failed)  # then the load fails, in one line


def test_downloads_say_how_much_has_come_as_they_go_and_what_came_at_the_end(slow_hub, caplog, tmp_path):
    """Measured from the cache's folders, whichever library fetches the files: two repositories at once, one
    already in the cache that stays as it was."""
    from huggingface_hub import hf_hub_download

    from lorafactory.hubfetch import reporting_downloads

    (tmp_path / "hub" / "models--someone--cached" / "blobs").mkdir(parents=True)
    (tmp_path / "hub" / "models--someone--cached" / "blobs" / "old").write_bytes(b"0" * 1000)
    caplog.set_level(logging.INFO, logger="lorafactory")
    with reporting_downloads(every=0.3):
        fetches = [
            threading.Thread(target=hf_hub_download, args=(repo, "unet/model.safetensors"), kwargs=kind)
            for repo, kind in (("someone/model", {}), ("someone/images", {"repo_type": "dataset"}))
        ]
        for fetch in fetches:
            fetch.start()
        for fetch in fetches:
            fetch.join()
    said = [r.getMessage() for r in caplog.records if r.name == "lorafactory.hubfetch"]
    assert said[-1] == (
        "downloaded into the Hugging Face cache: datasets/someone/images (40.0 MB), someone/model (40.0 MB)"
    )
    for repo in ("someone/model", "datasets/someone/images"):
        lines = [re.fullmatch(rf"downloading {repo}: ([\d.]+) MB so far, [\d.]+ (k?B|MB)/s", line) for line in said]
        sizes = [float(m[1]) for m in lines if m]
        assert len(sizes) >= 2, said  # each file arrives over about two seconds, watched every 0.3 s
        assert sizes == sorted(set(sizes)) and sizes[-1] <= 40.0  # a line when more came
    assert not [line for line in said if "someone/cached" in line]


def test_nothing_is_said_of_models_in_the_cache_folders_or_offline(monkeypatch, caplog, kit):
    from huggingface_hub import constants

    from lorafactory.hubfetch import say_if_downloading

    caplog.set_level(logging.INFO, logger="lorafactory")
    cached = next(p for p in kit.hub.glob("models--*/snapshots/*/**/*") if p.is_file())
    repo = cached.relative_to(kit.hub).parts[0].removeprefix("models--").replace("--", "/")
    probe = "/".join(cached.parts[cached.parts.index("snapshots") + 2 :])
    say_if_downloading("someone/uncached", "config.json", "CLIP model")  # offline: the stage fails, naming it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    say_if_downloading(repo, probe, "base model")
    say_if_downloading(str(kit.tiny_sd), "model_index.json", "base model")
    assert not [r for r in caplog.records if r.name == "lorafactory.hubfetch"]
    say_if_downloading("someone/uncached", "config.json", "CLIP model")
    assert [r.getMessage().split(" is not")[0] for r in caplog.records] == ["CLIP model someone/uncached"]
