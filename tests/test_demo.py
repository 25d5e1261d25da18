"""`lorafactory demo` as a newcomer runs it: a subprocess, the kit cached, everything offline."""

import json
import os
import subprocess
import sys

import httpx
import pytest

from conftest import DEMO_GROUP, KIT_ROOT
from lorafactory.demo import REPLAY_PORTS, replay_for, workspace_port
from lorafactory.train.model import load_pipeline


def test_the_demo_replay_keeps_its_address_for_a_workspace_and_moves_only_when_that_port_is_taken(kit, tmp_path):
    """The crawl records the site's address, so the demo's replay listens on a port fixed by the workspace:
    a rerun finds its stages up to date instead of crawling, and so redoing, everything. A port taken by
    another program is given up for any free one."""
    port = workspace_port(tmp_path)
    assert port in REPLAY_PORTS and workspace_port(tmp_path / "sub" / "..") == port
    url = f"http://127.0.0.1:{port}"
    with replay_for(kit, port) as first:
        assert first.url == url
        with replay_for(kit, port) as second:
            assert second.url != url
            assert httpx.get(f"{second.url}/posts.json", params={"tags": "1girl"}).status_code == 200
    with replay_for(kit, port) as again:
        assert again.url == url


@pytest.mark.slow
@DEMO_GROUP
def test_demo_command_produces_a_loadable_release(kit, demo_run):
    """The command's run is the shared ``demo_run`` (the other tests of the whole run read its workspace)."""
    result, root = demo_run["command"], demo_run["workspace"].root
    assert "neither the images nor the metrics mean anything" in result.stderr
    assert "gemm_4bit_forward" not in result.stderr  # bitsandbytes' optional-kernel notice is not shown
    assert "it/s]" not in result.stderr  # nor libraries' own tqdm bars (imgutils' CCIP clustering) between ours
    assert "RecScore" in result.stdout and "BikiniPlus" in result.stdout and "Release:" in result.stdout
    release = root / "akane_hoshino" / "release"
    assert (
        (release / "README.md").is_file()
        and (release / "metrics_plot.png").is_file()
        and (release / "metrics.csv").is_file()
    )
    assert all((step / "metrics.json").is_file() for step in (release / "steps").iterdir())
    recorded = json.loads((root / "akane_hoshino" / "crawl" / "manifest.json").read_text())
    assert f"http://127.0.0.1:{workspace_port(root)}" in json.dumps(recorded)  # a rerun crawls nothing
    report = (root / "report" / "report.html").read_text(encoding="utf-8")  # the demo's report, as printed
    assert "Report:" in result.stdout and "1 character (everything in the store)" in report
    assert "Akane Hoshino" in report and "../akane_hoshino/release/README.md" in report  # linked to its card
    pipe = load_pipeline(str(kit.tiny_sd))
    pipe.load_lora_weights(str(release / "akane_hoshino_lora.safetensors"))
    pipe.load_textual_inversion(str(release / "embeddings" / "akane_hoshino.pt"), token="akane_hoshino")
    assert "akane_hoshino_1" in pipe.tokenizer.get_vocab()  # the tiny-demo preset trains 2 vectors


@pytest.mark.slow
def test_fleet_demo_runs_three_characters_through_a_local_ray_fleet(tmp_path):
    """With shorter training (``--set``, which every character's job takes): the fleet is the subject here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_HUB")}
    env["COLUMNS"] = "200"
    shorter = ["--set", "train.max_steps=4", "--set", "train.save_every=2"]
    result = subprocess.run(
        [sys.executable, "-m", "lorafactory", "demo", "--fleet", "-w", str(tmp_path / "ws"), "--cache", str(KIT_ROOT)]
        + shorter,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for slug, name in (("akane_hoshino", "Akane Hoshino"), ("midori_kaze", "Midori Kaze"), ("sora_aoi", "Sora Aoi")):
        assert f"{name} model → queued for release" in result.stdout
        assert (tmp_path / "ws" / slug / "release" / "manifest.json").is_file()
        train = json.loads((tmp_path / "ws" / slug / "train" / "manifest.json").read_text())
        assert sorted(train["details"]["checkpoints"], key=int) == ["2", "4"]
    assert "jobs done" in result.stdout and "│ 3" in result.stdout  # the fleet status table closes the demo
    report = (tmp_path / "ws" / "report" / "report.html").read_text(encoding="utf-8")
    assert "3 characters (everything in the store); 3 whose latest run succeeded" in report
