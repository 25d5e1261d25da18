import pytest

from lorafactory.errors import InputError
from lorafactory.sources.danbooru import DanbooruSource, character_tag, choose_variant
from lorafactory.sources.http import PoliteClient
from lorafactory.sources.local import crawl_local
from lorafactory.testing.replay import DanbooruReplay, ReplayImage


def test_local_folder_with_sidecars_and_a_broken_file(tmp_path, kit):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("main_000.png", "main_001.png"):
        (src / name).write_bytes((kit.images / name).read_bytes())
    (src / "main_000.txt").write_text("red_hair, smile\n1girl")
    (src / "zz_copy.png").write_bytes((kit.images / "main_000.png").read_bytes())
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    dest = tmp_path / "dest"
    dest.mkdir()
    posts, counts = crawl_local(src, dest, limit=10)
    assert counts == {"found": 4, "unreadable": 1, "duplicate": 1, "kept": 2}
    tagged = next(p for p in posts if p.post_id == "main_000.png")
    assert tagged.tags["general"] == ["red_hair", "smile", "1girl"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.filename for p in posts)


def test_local_folder_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match="does not exist; pass an existing folder"):
        crawl_local(tmp_path / "nope", tmp_path, 5)
    with pytest.raises(InputError, match="has no images"):
        crawl_local(tmp_path, tmp_path, 5)


def test_variant_choice_prefers_the_smallest_big_enough():
    raw = {
        "file_url": "o.png", "image_width": 2000, "image_height": 3000,
        "media_asset": {"variants": [
            {"type": "360x360", "url": "t.jpg", "width": 240, "height": 360},
            {"type": "sample", "url": "s.jpg", "width": 850, "height": 1275},
            {"type": "original", "url": "o.png", "width": 2000, "height": 3000},
        ]},
    }  # fmt: skip
    assert choose_variant(raw, 800)[0] == "s.jpg"
    assert choose_variant(raw, 1200)[0] == "o.png"
    assert choose_variant(raw, 5000)[0] == "o.png"  # nothing big enough: the largest
    assert choose_variant({"id": 1}, 10) is None
    assert character_tag("Surtr (Arknights)") == "surtr_(arknights)"


def test_danbooru_crawl_pages_and_limits(tmp_path, kit):
    images = sorted(kit.images.glob("main_*.png"))[:7]
    replay = DanbooruReplay([ReplayImage(p, ["1girl"], ["akane"]) for p in images] + [ReplayImage(kit.images / "other_000.png", [], ["x"])])
    with replay, PoliteClient("lorafactory-tests", 5, 0, 0) as client:
        source = DanbooruSource(client, replay.url, page_size=3)
        posts, counts = source.crawl(["akane"], tmp_path, limit=5, min_size=0)
        assert len(posts) == 5 and counts["kept"] == 5
        assert len({p.md5 for p in posts}) == 5
        assert posts[0].tags["character"] == ["akane"] and posts[0].site == "danbooru"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.filename for p in posts)
        pages = [path for _, path in replay.requests if path.startswith("/posts.json")]
        assert len(pages) == 2  # 3 + 3 posts seen before the limit of 5 was reached
        assert all("User-Agent" not in p for p in pages)


def _replay(kit):
    return DanbooruReplay([ReplayImage(kit.images / "main_000.png", [], ["akane"])])


def test_retry_after_is_honoured_and_5xx_retried(kit):
    replay = _replay(kit)
    replay.faults += [(429, {"Retry-After": "0.5"}, b"slow down"), (503, {}, b"busy"), (502, {}, b"bad gateway")]
    with replay, PoliteClient("lorafactory-tests", 5, max_retries=4, interval_s=0) as client:
        response = client.get(f"{replay.url}/posts.json", params={"tags": "akane"})
        assert response.status_code == 200 and len(response.json()) == 1
        times = [t for t, _ in replay.requests]
        assert len(times) == 4
        assert times[1] - times[0] >= 0.5  # waited as Retry-After asked


def test_retries_are_bounded(kit):
    replay = _replay(kit)
    replay.faults += [(500, {}, b"oops")] * 3
    with replay, PoliteClient("lorafactory-tests", 5, max_retries=1, interval_s=0) as client:
        assert client.get(f"{replay.url}/posts.json").status_code == 500
        assert len(replay.requests) == 2


def test_cloudflare_challenge_stops_the_site(kit, tmp_path):
    from lorafactory.sources.http import CloudflareBlocked

    replay = _replay(kit)
    replay.faults.append((403, {"Server": "cloudflare", "cf-mitigated": "challenge"}, b"<html>Just a moment...</html>"))
    with replay, PoliteClient("lorafactory-tests", 5, max_retries=3, interval_s=0) as client:
        with pytest.raises(CloudflareBlocked, match="Cloudflare challenge"):
            DanbooruSource(client, replay.url, 10).crawl(["akane"], tmp_path, 5, 0)
        assert len(replay.requests) == 1  # no hammering


def test_requests_are_spaced_by_the_interval(kit, tmp_path):
    replay = DanbooruReplay([ReplayImage(p, [], ["akane"]) for p in sorted(kit.images.glob("main_*.png"))[:3]])
    with replay, PoliteClient("lorafactory-tests", 5, max_retries=0, interval_s=0.2) as client:
        DanbooruSource(client, replay.url, 2).crawl(["akane"], tmp_path, 3, 0)
    times = [t for t, _ in replay.requests]
    assert len(times) >= 5 and min(b - a for a, b in zip(times, times[1:])) >= 0.19
