"""The offline demo: build the test kit, serve a danbooru replay on loopback, run the whole pipeline.

The pipeline runs in a child process so that ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` are set
before huggingface_hub is imported; the child goes through exactly the code a real run uses.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lorafactory.errors import StageError

DEMO_CHARACTER = "Akane Hoshino"
FLEET_CHARACTERS = ("Akane Hoshino", "Midori Kaze", "Sora Aoi")  # the fleet demo's queue
SYNTHETIC_VERSION = "2"  # bump when the synthetic images change, so cached kits are rebuilt
REPLAY_PORTS = range(20000, 30000)


@dataclass(frozen=True)
class Kit:
    hub: Path
    tiny_sd: Path
    tiny_clip: Path
    images: Path


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorafactory" / "testkit"


def build_kit(cache: Path) -> Kit:
    """The stand-in hub, the tiny SD pipeline and CLIP, and the synthetic images, each built once and cached."""
    from lorafactory.testing.standin_hub import build_standin_hub
    from lorafactory.testing.synthetic import generate_dataset
    from lorafactory.testing.tiny_sd import build_tiny_clip, build_tiny_sd

    hub = build_standin_hub(cache / "hub")
    tiny = build_tiny_sd(cache / "tiny-sd")
    clip = build_tiny_clip(cache / "tiny-clip")
    images = cache / "images"
    if not (images / ".complete").is_file() or (images / ".complete").read_text() != SYNTHETIC_VERSION:
        if images.exists():
            shutil.rmtree(images)
        generate_dataset(images, count=24, seed=0)
        (images / ".complete").write_text(SYNTHETIC_VERSION)
    return Kit(hub, tiny, clip, images)


def replay_for(kit: Kit, port: int = 0):
    """A danbooru replay serving the synthetic set; one stranger is mistagged as the character. ``port``: the
    port it listens on when that is free (0: any free port)."""
    from lorafactory.sources.danbooru import character_tag
    from lorafactory.testing.replay import DanbooruReplay, ReplayImage

    items = []
    for path in sorted(kit.images.glob("*.*")):
        if path.name.startswith("."):
            continue
        mistagged = path.name == "other_000.png"
        character = (
            [character_tag(DEMO_CHARACTER)] if not path.name.startswith("other_") or mistagged else ["someone_else"]
        )
        items.append(ReplayImage(path, ["1girl", "solo"], character))
    return DanbooruReplay(items, port=port)


def offline_env(kit: Kit) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(kit.hub), "HF_HUB_DISABLE_TELEMETRY": "1", "ONNX_MODE": "cpu"}
    )
    return env


def _demo_settings(kit: Kit, url: str, overrides: list[str]) -> list[str]:
    """The command-line settings that point a run at the kit's stand-in models and the replay, then
    the user's ``--set`` overrides."""
    return [
        "--preset",
        "tiny-demo",
        "--set",
        f'crawl.danbooru.base_url="{url}"',
        "--set",
        f'train.base_model="{kit.tiny_sd}"',
        "--set",
        f'evaluate.clip_model="{kit.tiny_clip}"',
        *(arg for override in overrides for arg in ("--set", override)),
    ]


def _lorafactory(kit: Kit, *args: str, what: str) -> None:
    """A lorafactory command in a child process (offline environment set before any import)."""
    result = subprocess.run([sys.executable, "-m", "lorafactory", *args], env=offline_env(kit), check=False)
    if result.returncode != 0:
        raise StageError(f"the demo's {what} failed (exit {result.returncode}); see the messages above")


def workspace_port(workspace: Path) -> int:
    """The replay's port for a workspace, the same at every run (below Linux's ephemeral ports): the crawl
    records the site's address, so a replay on another port would make a rerun crawl, and so redo, everything."""
    digest = hashlib.sha256(str(workspace.resolve()).encode()).digest()
    return REPLAY_PORTS.start + int.from_bytes(digest[:4], "big") % len(REPLAY_PORTS)


def run_demo(workspace: Path, cache: Path, overrides: list[str], force: str | None = None) -> None:
    """The demo character through the whole pipeline; ``overrides`` are ``--set`` settings. A rerun on the same
    workspace finds its stages done (its replay listens on the same port, when that port is free)."""
    kit = build_kit(cache)
    with replay_for(kit, workspace_port(workspace)) as replay:
        command = ["run", DEMO_CHARACTER, "--site", "danbooru", "--workspace", str(workspace)]
        command += _demo_settings(kit, replay.url, overrides) + (["--force", force] if force else [])
        _lorafactory(kit, *command, what="pipeline")


def fleet_images(cache: Path) -> dict[str, Path]:
    """A synthetic image folder per fleet demo character (each with its own look; file names start
    with the character's, as a site's are unique), built once."""
    from lorafactory.testing.synthetic import CHARACTERS, generate_dataset

    folders = {}
    for index, name in enumerate(FLEET_CHARACTERS):
        slug = name.lower().replace(" ", "_")
        folder = cache / "fleet-images" / slug
        marker = folder / ".complete"
        if not marker.is_file() or marker.read_text() != SYNTHETIC_VERSION:
            shutil.rmtree(folder, ignore_errors=True)
            character = next(c for c in CHARACTERS if c.name == name)
            for image in generate_dataset(folder, character, count=16, seed=index, others=2):
                (folder / image.filename).rename(folder / f"{slug}-{image.filename}")
            marker.write_text(SYNTHETIC_VERSION)
        folders[name] = folder
    return folders


def fleet_replay(cache: Path, port: int = 0):
    """One danbooru replay serving every fleet demo character's images under its own tag (on ``port`` when
    it is free)."""
    from lorafactory.sources.danbooru import character_tag
    from lorafactory.testing.replay import DanbooruReplay, ReplayImage

    items = []
    for name, folder in fleet_images(cache).items():
        for path in sorted(folder.glob("*.*")):
            if not path.name.startswith("."):
                tag = "someone_else" if "-other_" in path.name else character_tag(name)
                items.append(ReplayImage(path, ["1girl", "solo"], [tag]))
    return DanbooruReplay(items, port=port)


def run_fleet_demo(workspace: Path, cache: Path, overrides: list[str]) -> None:
    """Queue the three fleet demo characters (with the ``--set`` ``overrides``) and run them on a local Ray fleet."""
    kit = build_kit(cache)
    with fleet_replay(cache, workspace_port(workspace)) as replay:
        ws = ["--workspace", str(workspace)]
        _lorafactory(
            kit, "queue", "add", *FLEET_CHARACTERS, *_demo_settings(kit, replay.url, overrides), *ws, what="queue"
        )
        _lorafactory(kit, "fleet", "run", *ws, what="fleet")
