import asyncio
import contextlib
import logging
import time
from urllib.parse import quote, quote_plus

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from lorafactory.cli import app
from lorafactory.config import load_settings
from lorafactory.errors import InputError, StageError
from lorafactory.progress import SilentProgress
from lorafactory.sources.base import file_md5
from lorafactory.sources.crawl import MemoryArchive, crawl
from lorafactory.sources.danbooru import character_tag, choose_variant
from lorafactory.sources.http import CloudflareBlocked, RateLimit, SiteClient
from lorafactory.sources.local import LocalFolder, crawl_local, sidecar_tags
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
    posts, counts = crawl_local(LocalFolder(src), dest, limit=10)
    assert counts == {"found": 4, "unreadable": 1, "duplicate": 1, "not_images": 0, "kept": 2}
    tagged = next(p for p in posts if p.post_id == "main_000.png")
    assert tagged.tags["general"] == ["red_hair", "smile", "1girl"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.filename for p in posts)
    for limit in range(1, 6):  # the crawl's bar (total: min(limit, images)) ends full, skipped files or not
        calls = []
        (tmp_path / f"limit{limit}").mkdir()
        posts, _ = crawl_local(LocalFolder(src), tmp_path / f"limit{limit}", limit, lambda: calls.append(1))
        assert (len(posts), len(calls)) == (min(limit, 2), min(limit, 4)), limit


def test_local_folder_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match="does not exist; pass an existing folder"):
        LocalFolder(tmp_path / "nope")
    (tmp_path / ".hidden.png").write_bytes(b"")
    with pytest.raises(InputError, match="has no images"):
        LocalFolder(tmp_path)


class _Counted(SilentProgress):
    def __init__(self):
        self.tasks = []

    @contextlib.contextmanager
    def task(self, description, total):
        advanced = [description, total, 0]
        self.tasks.append(advanced)

        class _Task:
            def advance(self, amount=1):
                advanced[2] += amount

            def complete(self):
                advanced[1] = advanced[2]

        yield _Task()


def test_a_local_folder_reads_every_image_type_and_reports_the_files_it_leaves_out(tmp_path, kit, caplog):
    """TIFF, JFIF and AVIF are images too (subfolders included); hidden files are nobody's dataset; anything else
    is counted and named in a warning. The progress bar counts the images kept, out of what the folder holds."""
    src = tmp_path / "src"
    for folder in ("sub", ".thumbnails"):
        (src / folder).mkdir(parents=True)
    image = Image.open(kit.images / "main_000.png").convert("RGB")
    image.save(src / "a.TIFF")
    image.rotate(90).save(src / "sub" / "b.jfif", "JPEG")
    image.rotate(180).save(src / "c.avif")
    image.save(src / ".thumbnails" / "thumb.png")
    image.save(src / "._a.png")
    (src / "notes.pdf").write_bytes(b"%PDF-1.4")
    (src / "sub" / "phone.heic").write_bytes(b"heic")
    (src / "a.txt").write_text("smile")
    dest = tmp_path / "dest"
    progress = _Counted()
    settings = load_settings(overrides=['crawl.source="local"', f'crawl.from_dir="{src}"', "crawl.limit=10"])
    with caplog.at_level(logging.WARNING, logger="lorafactory.sources.local"):
        posts, counts = crawl(settings, dest, progress)
    assert counts == {"found": 3, "unreadable": 0, "duplicate": 0, "not_images": 2, "kept": 3}
    assert sorted(post.post_id for post in posts) == ["a.TIFF", "c.avif", "sub/b.jfif"]
    assert next(post for post in posts if post.post_id == "a.TIFF").tags["general"] == ["smile"]
    assert "2 files that are not images were left out (.heic, .pdf)" in caplog.text
    assert progress.tasks == [[f"crawling {src}", 3, 3]]  # not out of crawl.limit's 10
    settings.crawl.limit = 2
    crawl(settings, tmp_path / "fewer", progress)
    assert progress.tasks[-1][1:] == [2, 2]


def test_variant_choice_prefers_the_smallest_big_enough():
    raw = {
        "file_url": "o.png",
        "image_width": 2000,
        "image_height": 3000,
        "media_asset": {
            "variants": [
                {"type": "360x360", "url": "t.jpg", "width": 240, "height": 360},
                {"type": "sample", "url": "s.jpg", "width": 850, "height": 1275},
                {"type": "original", "url": "o.png", "width": 2000, "height": 3000},
            ]
        },
    }
    assert choose_variant(raw, 800)[0] == "s.jpg"
    assert choose_variant(raw, 1200)[0] == "o.png"
    assert choose_variant(raw, 5000)[0] == "o.png"  # nothing big enough: the largest
    assert choose_variant({"id": 1}, 10) is None
    assert character_tag("Surtr (Arknights)") == "surtr_(arknights)"


def _settings(*replays, **extra):
    overrides = [
        'character.name="Akane"',
        'crawl.tags=["akane"]',
        "crawl.min_size=0",
        "crawl.page_size=3",
        "crawl.max_retries=3",
    ]
    names = ["danbooru", "safebooru"][: len(replays)]
    overrides.append(f"crawl.sites={names!r}".replace("'", '"'))
    for name, replay in zip(names, replays):
        overrides += [
            f'crawl.{name}.base_url="{replay.url}"',
            f"crawl.{name}.requests_per_second={extra.get('rps', 100)}",
        ]
    overrides += extra.get("more", [])
    return load_settings(overrides=overrides)


def _replay(kit, count=7, **kwargs):
    images = sorted(kit.images.glob("main_*.png"))[:count]
    return DanbooruReplay([ReplayImage(p, ["1girl"], ["akane"]) for p in images], **kwargs)


def test_keyset_paging_goes_past_the_page_cap(tmp_path, kit):
    progress = _Counted()
    with _replay(kit, page_cap=1) as replay:
        posts, counts = crawl(_settings(replay), tmp_path, progress)
    assert len(posts) == 7 and counts["downloaded"] == 7 and len({p.md5 for p in posts}) == 7
    assert progress.tasks == [["crawling danbooru", 7, 7]]  # ends full: the site had 7, fewer than crawl.limit
    pages = [path for _, path in replay.requests if path.startswith("/posts.json")]
    assert any("page=b" in p for p in pages) and not any("page=2" in p for p in pages)
    assert posts[0].tags["character"] == ["akane"] and posts[0].site == "danbooru"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(p.filename for p in posts)


def test_limit_archive_and_cross_site_dedupe(tmp_path, kit):
    with _replay(kit) as a, _replay(kit, count=5) as b:
        archive = MemoryArchive()
        posts, counts = crawl(_settings(a, b), tmp_path / "one", SilentProgress(), archive)
        assert len(posts) == 7 and counts["duplicate"] >= 5  # the second site holds copies (same md5) of the first's
        downloads = sum(1 for _, path in a.requests + b.requests if path.startswith("/data/"))
        assert downloads == 7
        again, counts = crawl(
            _settings(a, b), tmp_path / "two", SilentProgress(), archive, previous=tmp_path / "one" / "images"
        )
        assert counts.get("downloaded", 0) == 0 and counts["from_archive"] == 7  # nothing fetched twice
        assert sum(1 for _, path in a.requests + b.requests if path.startswith("/data/")) == downloads
        assert [p.post_id for p in again] == [p.post_id for p in posts]


def _paced(starts: list[float], per_second: float) -> bool:
    """Request arrivals ``per_second`` at most: on average over the run, and never more than two within one
    interval. The server sees each request a little after the limiter let it go, later when the test machine
    stalls: a request held up that way can arrive just before the next one, which came on time (a pair close
    together after a long gap); an unpaced crawl's requests all arrive milliseconds apart, and one paced at
    twice the rate falls short of the average."""
    interval = 1 / per_second
    crowded = max(sum(1 for t in starts if first <= t < first + interval) for first in starts)
    return crowded <= 2 and starts[-1] - starts[0] >= (len(starts) - 1) * interval - interval / 2


def test_rate_limit_holds_per_site(tmp_path, kit):
    with _replay(kit, count=6) as replay:
        crawl(_settings(replay, rps=8, more=["crawl.danbooru.concurrency=4"]), tmp_path, SilentProgress())
    starts = sorted(t for t, _ in replay.requests)
    assert len(starts) >= 8 and _paced(starts, 8)


def test_a_failing_site_does_not_stop_the_others(tmp_path, kit):
    with _replay(kit) as good, _replay(kit, count=2) as bad:
        bad.faults += [(500, {}, b"down")] * 50
        posts, counts = crawl(_settings(bad, good, more=["crawl.max_retries=1"]), tmp_path, SilentProgress())
    assert len(posts) == 7 and counts["danbooru_failed"] == 1


def test_bad_bodies_never_land(tmp_path, kit):
    with _replay(kit, count=3, latency_s=0.01) as replay:
        replay.data_faults += [
            (200, {"Content-Type": "text/html"}, b"<html>not an image</html>"),  # skipped
            (200, {"Content-Type": "image/png", "Content-Length": "99999"}, b"\x89PNG truncated"),  # retried
        ]
        posts, counts = crawl(_settings(replay, more=["crawl.danbooru.concurrency=1"]), tmp_path, SilentProgress())
    assert counts["failed"] == 1 and len(posts) == 2 and counts["downloaded"] == 2
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert files == sorted(p.filename for p in posts)  # no partial or rejected file landed


def _client(replay, retries=4):
    http = httpx.AsyncClient()
    return http, SiteClient("danbooru", http, RateLimit(1000, 2), retries, ("sekrit",))


def test_retry_after_is_honoured_and_5xx_retried(kit):
    async def go(replay):
        http, client = _client(replay)
        async with http:
            return await client.get(f"{replay.url}/posts.json", params={"tags": "akane"})

    with _replay(kit, count=1) as replay:
        replay.faults += [(429, {"Retry-After": "0.5"}, b"slow down"), (503, {}, b"busy"), (502, {}, b"bad gateway")]
        response = asyncio.run(go(replay))
    assert response.status_code == 200 and len(response.json()) == 1
    times = [t for t, _ in replay.requests]
    assert len(times) == 4 and times[1] - times[0] >= 0.5  # waited as Retry-After asked


def test_retries_are_bounded_and_secrets_redacted(kit):
    async def go(replay):
        http, client = _client(replay, retries=1)
        async with http:
            response = await client.get(f"{replay.url}/posts.json")
            return response, client.redact("key=sekrit")

    with _replay(kit, count=1) as replay:
        replay.faults += [(500, {}, b"oops")] * 3
        response, redacted = asyncio.run(go(replay))
    assert response.status_code == 500 and len(replay.requests) == 2 and redacted == "key=***"


def test_cloudflare_challenge_stops_the_site(tmp_path, kit):
    with _replay(kit) as replay:
        replay.faults.append(
            (403, {"Server": "cloudflare", "cf-mitigated": "challenge"}, b"<html>Just a moment...</html>")
        )
        with pytest.raises(CloudflareBlocked, match="Cloudflare challenge"):
            crawl(_settings(replay), tmp_path, SilentProgress())
    assert len(replay.requests) == 1  # no hammering


def test_unknown_site_and_half_credentials(tmp_path, kit, monkeypatch):
    with _replay(kit, count=1) as replay:
        monkeypatch.setenv("LORAFACTORY_DANBOORU_LOGIN", "me")
        with pytest.raises(InputError, match="LORAFACTORY_DANBOORU_API_KEY"):
            crawl(_settings(replay), tmp_path, SilentProgress())
    assert issubclass(CloudflareBlocked, StageError)


@pytest.mark.parametrize("site", ["gelbooru", "rule34", "yandere", "konachan"])
def test_other_site_apis_page_past_their_caps(tmp_path, kit, site):
    from lorafactory.testing.replay import GelbooruReplay, MoebooruReplay

    kind = GelbooruReplay if site in ("gelbooru", "rule34") else MoebooruReplay
    images = sorted(kit.images.glob("main_*.png"))[:7]
    with kind([ReplayImage(p, ["1girl"], ["akane"]) for p in images], page_cap=1) as replay:
        settings = load_settings(
            overrides=[
                'character.name="Akane"',
                'crawl.tags=["akane"]',
                "crawl.min_size=0",
                "crawl.page_size=3",
                f'crawl.sites=["{site}"]',
                f'crawl.{site}.base_url="{replay.url}"',
                f"crawl.{site}.requests_per_second=100",
            ]
        )
        posts, counts = crawl(settings, tmp_path, SilentProgress())
    assert len(posts) == 7 and counts["downloaded"] == 7 and {p.site for p in posts} == {site}
    assert [int(p.post_id) for p in posts] == sorted((int(p.post_id) for p in posts), reverse=True)
    assert all("id:<" not in path for _, path in replay.requests[:1]) and any(
        "id%3A%3C" in path for _, path in replay.requests
    )


def test_gelbooru_without_credentials_says_which_to_set(tmp_path, kit, monkeypatch):
    from lorafactory.testing.replay import GelbooruReplay

    replay = GelbooruReplay([ReplayImage(kit.images / "main_000.png", [], ["akane"])])
    replay.credentials = ("123", "secret-key")
    with replay:
        settings = load_settings(
            overrides=[
                'character.name="Akane"',
                'crawl.tags=["akane"]',
                'crawl.sites=["gelbooru"]',
                f'crawl.gelbooru.base_url="{replay.url}"',
            ]
        )
        with pytest.raises(StageError, match="LORAFACTORY_GELBOORU_USER_ID"):
            crawl(settings, tmp_path / "a", SilentProgress())
        monkeypatch.setenv("LORAFACTORY_GELBOORU_USER_ID", "123")
        monkeypatch.setenv("LORAFACTORY_GELBOORU_API_KEY", "secret-key")
        posts, _ = crawl(settings, tmp_path / "b", SilentProgress())
    assert len(posts) == 1
    assert "secret-key" not in (tmp_path / "b" / "posts.jsonl").read_text()


def test_zerochan_rules_redirects_and_control_characters(tmp_path, kit):
    from lorafactory.testing.replay import ZerochanReplay

    images = sorted(kit.images.glob("main_*.png"))[:5]
    replay = ZerochanReplay([ReplayImage(p, ["Female"], ["Akane Hoshino"]) for p in images])
    replay.aliases = {"Hoshino Akane": "Akane Hoshino"}
    overrides = ['character.name="Hoshino Akane"', "crawl.min_size=0", "crawl.page_size=2", 'crawl.sites=["zerochan"]']
    with replay:
        overrides += [f'crawl.zerochan.base_url="{replay.url}"', "crawl.zerochan.requests_per_second=100"]
        with pytest.raises(InputError, match="crawl.zerochan.username"):
            crawl(load_settings(overrides=overrides), tmp_path / "a", SilentProgress())
        posts, counts = crawl(
            load_settings(overrides=[*overrides, 'crawl.zerochan.username="tester"']), tmp_path / "b", SilentProgress()
        )
    assert len(posts) == 5 and counts["downloaded"] == 5 and posts[0].site == "zerochan"
    assert posts[0].tags["general"] and all(agent.endswith(" - tester") for agent in replay.agents)
    assert any(path.startswith("/Hoshino+Akane") for _, path in replay.requests)  # followed the redirect


@pytest.mark.parametrize("site", ["danbooru", "gelbooru", "yandere", "sankaku", "anime_pictures"])
def test_the_name_is_looked_up_as_the_most_posted_character_tag(tmp_path, kit, site):
    from lorafactory.testing.replay import AnimePicturesReplay, GelbooruReplay, MoebooruReplay, SankakuReplay

    kind = {
        "danbooru": DanbooruReplay,
        "gelbooru": GelbooruReplay,
        "yandere": MoebooruReplay,
        "sankaku": SankakuReplay,
        "anime_pictures": AnimePicturesReplay,
    }[site]
    mains = sorted(kit.images.glob("main_*.png"))
    images = [ReplayImage(p, ["1girl"], ["akane_hoshino_(idol)"]) for p in mains[:5]]
    images += [ReplayImage(p, ["1girl"], ["akane_hoshino_(cosplay)"]) for p in mains[5:7]]  # a rarer namesake
    archive = MemoryArchive()
    with kind(images) as replay:
        overrides = [
            'character.name="Akane Hoshino"',
            "crawl.min_size=0",
            f'crawl.sites=["{site}"]',
            f'crawl.{site}.base_url="{replay.url}"',
            f"crawl.{site}.requests_per_second=100",
        ]
        posts, counts = crawl(load_settings(overrides=overrides), tmp_path / "a", SilentProgress(), archive)
        chosen = (
            "akane hoshino (idol)" if site == "anime_pictures" else "akane_hoshino_(idol)"
        )  # its tag style: spaces
        assert counts["tags"] == {site: chosen} and len(posts) == 5
        marker = {
            "danbooru": "/autocomplete.json",
            "gelbooru": "s=tag",
            "yandere": "/tag.json",
            "sankaku": "/tags?",
            "anime_pictures": "/api/v3/tags",
        }[site]
        first_run = len(replay.requests)
        assert sum(marker in path for _, path in replay.requests) == 1
        crawl(load_settings(overrides=overrides), tmp_path / "b", SilentProgress(), archive)
        assert not any(marker in path for _, path in replay.requests[first_run:])  # remembered, not asked again
    assert archive.site_tag(site, "Akane Hoshino") == (chosen, 5)


def test_disk_full_stops_the_crawl_and_leaves_no_partial_file(tmp_path, kit, monkeypatch):
    """A full disk (simulated at that edge: the write fails with ENOSPC) stops the crawl cleanly."""
    import errno
    import os as os_module

    from lorafactory.sources import http as http_module
    from lorafactory.sources.http import StorageFull

    real_fdopen = os_module.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(http_module.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with _replay(kit, count=3) as replay:
        with pytest.raises(StorageFull, match="No space left on device; free disk space"):
            crawl(_settings(replay), tmp_path, SilentProgress())
    assert list((tmp_path / "images").iterdir()) == []  # no partial file landed


def test_cli_crawls_two_sites_with_a_limit(tmp_path, kit):
    from typer.testing import CliRunner

    from lorafactory.cli import app
    from lorafactory.testing.replay import ZerochanReplay

    mains = sorted(kit.images.glob("main_*.png"))
    with (
        DanbooruReplay([ReplayImage(p, ["1girl"], ["akane_hoshino"]) for p in mains[:6]]) as booru,
        ZerochanReplay([ReplayImage(p, ["Female"], ["Akane Hoshino"]) for p in mains[4:10]]) as zerochan,
    ):
        result = CliRunner().invoke(
            app,
            [
                "crawl",
                "Akane Hoshino",
                "--site",
                "danbooru",
                "--site",
                "zerochan",
                "--limit",
                "500",
                "--workspace",
                str(tmp_path),
                "--set",
                f'crawl.danbooru.base_url="{booru.url}"',
                "--set",
                f'crawl.zerochan.base_url="{zerochan.url}"',
                "--set",
                'crawl.zerochan.username="tester"',
                "--set",
                "crawl.zerochan.requests_per_second=50",
                "--set",
                "crawl.danbooru.requests_per_second=50",
                "--set",
                "crawl.min_size=0",
            ],
        )
    assert result.exit_code == 0, result.output
    posts = (tmp_path / "akane_hoshino" / "crawl" / "posts.jsonl").read_text().splitlines()
    assert len(posts) == 10  # 6 + 6 with 2 shared images, deduplicated by md5
    assert {'"site":"danbooru"' in p or '"site": "danbooru"' in p for p in posts} == {True, False}


def test_anime_pictures_pages_details_and_downloads(tmp_path, kit):
    from lorafactory.testing.replay import AnimePicturesReplay

    images = [ReplayImage(p, ["1girl"], ["akane_hoshino"]) for p in sorted(kit.images.glob("main_*.png"))[:6]]
    with AnimePicturesReplay(images) as replay:
        settings = load_settings(
            overrides=[
                'character.name="Akane Hoshino"',
                "crawl.min_size=0",
                'crawl.sites=["anime_pictures"]',
                f'crawl.anime_pictures.base_url="{replay.url}"',
                "crawl.anime_pictures.requests_per_second=100",
            ]
        )
        posts, counts = crawl(settings, tmp_path, SilentProgress())
    assert len(posts) == 6 and counts["downloaded"] == 6
    assert "akane hoshino" in posts[0].tags["general"]  # tags come from the detail request
    assert any("search_tag=akane+hoshino" in path for _, path in replay.requests)  # its tag style: spaces
    assert {p.name for p in (tmp_path / "images").iterdir()} == {p.filename for p in posts}


def test_sankaku_cursor_paging_typed_tags_and_expired_links(tmp_path, kit):
    from lorafactory.testing.replay import SankakuReplay

    images = [ReplayImage(p, ["1girl"], ["akane_hoshino"]) for p in sorted(kit.images.glob("main_*.png"))[:5]]
    replay = SankakuReplay(images)
    replay.expired = {images[0].path.name}
    with replay:
        settings = load_settings(
            overrides=[
                'character.name="Akane Hoshino"',
                "crawl.min_size=0",
                "crawl.page_size=2",
                'crawl.sites=["sankaku"]',
                f'crawl.sankaku.base_url="{replay.url}"',
                "crawl.sankaku.requests_per_second=100",
            ]
        )
        posts, counts = crawl(settings, tmp_path, SilentProgress())
    assert len(posts) == 4 and counts["failed"] == 1  # the expired link was refused, not saved as a picture
    assert posts[0].tags["character"] == ["akane_hoshino"] and not posts[0].post_id.isdigit()
    assert sum("next=" in path for _, path in replay.requests) == 2  # 5 posts, 2 a page: two cursors followed
    assert all("expired" not in p.name for p in (tmp_path / "images").iterdir())


def test_rate_limit_reset_header_is_honoured(kit):
    import time as time_module

    async def go(replay):
        http, client = _client(replay)
        async with http:
            return await client.get(f"{replay.url}/posts.json", params={"tags": "akane"})

    with _replay(kit, count=1) as replay:
        replay.faults.append((429, {"X-RateLimit-Reset": str(int(time_module.time()) + 2)}, b"slow down"))
        assert asyncio.run(go(replay)).status_code == 200
    times = [t for t, _ in replay.requests]
    assert len(times) == 2 and times[1] - times[0] >= 0.9  # waited until the announced reset


def test_pixiv_oauth_date_windows_and_cross_site_md5(tmp_path, kit, monkeypatch):
    from lorafactory.testing.replay import PixivReplay

    mains = sorted(kit.images.glob("main_*.png"))
    pixiv = PixivReplay([ReplayImage(p, ["1girl"], ["Akane"]) for p in mains[:7]])
    pixiv.max_offset = 3  # deep paging is refused past this: the crawler must move the date window
    with pixiv, DanbooruReplay([ReplayImage(p, ["1girl"], ["akane"]) for p in mains[:2]]) as booru:
        overrides = [
            'character.name="Akane"',
            "crawl.min_size=0",
            'crawl.sites=["danbooru", "pixiv"]',
            'crawl.danbooru.tags=["akane"]',
            f'crawl.pixiv.base_url="{pixiv.url}"',
            f'crawl.danbooru.base_url="{booru.url}"',
            "crawl.pixiv.requests_per_second=100",
            "crawl.danbooru.requests_per_second=100",
            "crawl.danbooru.concurrency=1",
            "crawl.pixiv.concurrency=1",
        ]
        with pytest.raises(InputError, match="LORAFACTORY_PIXIV_REFRESH_TOKEN"):
            crawl(load_settings(overrides=[*overrides, 'crawl.sites=["pixiv"]']), tmp_path / "a", SilentProgress())
        for name, value in {
            "REFRESH_TOKEN": "refresh-me",
            "CLIENT_ID": "app",
            "CLIENT_SECRET": "app-secret",
            "OAUTH_URL": pixiv.url,
        }.items():
            monkeypatch.setenv(f"LORAFACTORY_PIXIV_{name}", value)
        posts, counts = crawl(load_settings(overrides=overrides), tmp_path / "b", SilentProgress())
    assert len(posts) == 7 and counts["duplicate"] == 2  # 2 pixiv works were danbooru's images: hashed, then dropped
    assert all(p.md5 for p in posts)
    assert any("end_date=" in path for _, path in pixiv.requests)  # the date window moved past the offset limit
    assert "refresh-me" not in (tmp_path / "b" / "posts.jsonl").read_text()


def test_danbooru_finds_the_tag_from_another_name_through_its_wiki(tmp_path, kit):
    images = [ReplayImage(p, ["1girl"], ["akane_hoshino_(idol)"]) for p in sorted(kit.images.glob("main_*.png"))[:3]]
    replay = DanbooruReplay(images)
    replay.other_names = {"akane_hoshino_(idol)": ["星野アカネ", "Hoshino Akane"]}
    with replay:
        overrides = [
            'character.name="星野アカネ"',
            "crawl.min_size=0",
            f'crawl.danbooru.base_url="{replay.url}"',
            "crawl.danbooru.requests_per_second=100",
        ]
        posts, counts = crawl(load_settings(overrides=overrides), tmp_path, SilentProgress())
    assert counts["tags"] == {"danbooru": "akane_hoshino_(idol)"} and len(posts) == 3


def test_credentials_from_the_config_work_and_are_never_written(tmp_path, kit):
    from lorafactory.config import to_toml
    from lorafactory.pipeline import run_pipeline
    from lorafactory.state import Store
    from lorafactory.testing.replay import GelbooruReplay
    from lorafactory.workspace import Workspace

    replay = GelbooruReplay(
        [ReplayImage(p, ["1girl"], ["akane_hoshino"]) for p in sorted(kit.images.glob("main_*.png"))[:3]]
    )
    replay.credentials = ("4242", "config-secret")
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    with replay:
        settings = load_settings(
            overrides=[
                'character.name="Akane Hoshino"',
                "crawl.min_size=0",
                'crawl.sites=["gelbooru"]',
                f'crawl.gelbooru.base_url="{replay.url}"',
                'crawl.gelbooru.user="4242"',
                'crawl.gelbooru.key="config-secret"',
                "crawl.gelbooru.requests_per_second=100",
            ]
        )
        run_pipeline(ws, Store(ws.default_db_url), settings, SilentProgress(), until="crawl")
    assert "config-secret" not in to_toml(settings) and "config-secret" not in repr(settings)
    written = [
        p for p in ws.root.rglob("*") if p.is_file() and p.suffix not in (".png", ".jpg")
    ]  # state db and its WAL too
    assert written and not any(b"config-secret" in p.read_bytes() for p in written)
    assert len((ws.character("akane_hoshino").artifact("crawl") / "posts.jsonl").read_text().splitlines()) == 3


def test_a_crawl_by_name_records_the_copyright_and_post_count_her_site_tag_names(tmp_path, kit):
    """Crawled as plain "Surtr", she is found under ``surtr_(arknights)``: the report's correlation panels
    need her copyright, read from the tag's qualifier, and a copyright given by the user is never replaced."""
    from lorafactory.pipeline import run_pipeline
    from lorafactory.state import Store
    from lorafactory.testing.replay import DanbooruReplay
    from lorafactory.workspace import Workspace

    images = sorted(kit.images.glob("main_*.png"))
    tagged = [ReplayImage(p, ["1girl"], ["surtr_(arknights)"]) for p in images[:3]]
    tagged += [ReplayImage(images[3], ["1girl"], ["w_(arknights)"])]
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    store = Store(ws.default_db_url)
    store.ensure_character("w", "W", "w", copyright="arknights_endfield")
    with DanbooruReplay(tagged) as replay:
        for name in ("Surtr", "W"):
            overrides = [
                f'character.name="{name}"',
                "crawl.min_size=0",
                'crawl.sites=["danbooru"]',
                f'crawl.danbooru.base_url="{replay.url}"',
                "crawl.danbooru.requests_per_second=100",
            ]
            run_pipeline(ws, store, load_settings(overrides=overrides), SilentProgress(), until="crawl")
    surtr, w = store.character_summary("surtr"), store.character_summary("w")
    assert (surtr["copyright"], surtr["popularity"]) == ("arknights", 3)
    assert (w["copyright"], w["popularity"]) == ("arknights_endfield", 1)


def test_copyright_of_reads_the_last_qualifier_of_a_character_tag():
    from lorafactory.sources.danbooru import copyright_of

    assert copyright_of("surtr_(arknights)") == "arknights"
    assert copyright_of("ganyu_(twilight_blossom)_(genshin_impact)") == "genshin_impact"
    assert copyright_of("hatsune_miku") is None and copyright_of("(a)") is None


def test_sankaku_login_unlocks_contentious_posts(tmp_path, kit, monkeypatch):
    from lorafactory.testing.replay import SankakuReplay

    images = [ReplayImage(p, ["1girl"], ["akane_hoshino"]) for p in sorted(kit.images.glob("main_*.png"))[:4]]
    replay = SankakuReplay(images)
    replay.contentious = {images[0].path.name}
    with replay:
        overrides = [
            'character.name="Akane Hoshino"',
            "crawl.min_size=0",
            'crawl.sites=["sankaku"]',
            'crawl.sankaku.tags=["akane_hoshino"]',
            f'crawl.sankaku.base_url="{replay.url}"',
            "crawl.sankaku.requests_per_second=100",
        ]
        anonymous, counts = crawl(load_settings(overrides=overrides), tmp_path / "a", SilentProgress())
        assert len(anonymous) == 3 and counts["no_file"] == 1
        monkeypatch.setenv("LORAFACTORY_SANKAKU_LOGIN", "me")
        monkeypatch.setenv("LORAFACTORY_SANKAKU_PASSWORD", "pw")
        logged_in, _ = crawl(load_settings(overrides=overrides), tmp_path / "b", SilentProgress())
    assert len(logged_in) == 4
    assert "sankaku-token" not in (tmp_path / "b" / "posts.jsonl").read_text()


def _downloads(replay):
    return [(t, path) for t, path in replay.requests if path.startswith("/data/")]


def test_retry_after_pauses_every_worker_of_the_site(tmp_path, kit):
    with _replay(kit, count=7, latency_s=0.02) as replay:
        replay.data_faults.append((429, {"Retry-After": "1"}, b"slow down"))
        settings = _settings(replay, rps=8, more=["crawl.danbooru.concurrency=4"])  # a start every 0.125 s
        posts, _ = crawl(settings, tmp_path, SilentProgress())
    assert len(posts) == 7
    first = _downloads(replay)[0][0]  # the request answered with the 429
    during = [path for t, path in replay.requests if first + 0.15 < t < first + 0.95]
    assert during == []  # nothing reached the site inside the window the server gave
    assert any(t >= first + 1.0 for t, _ in _downloads(replay))


def test_failed_downloads_are_replaced_until_the_limit(tmp_path, kit):
    with _replay(kit, count=9) as replay:
        replay.data_faults += [(404, {}, b"gone")] * 3
        settings = _settings(replay, more=["crawl.limit=5", "crawl.danbooru.concurrency=1"])
        posts, counts = crawl(settings, tmp_path, SilentProgress())
    assert len(posts) == 5 and counts["failed"] == 3
    assert len(_downloads(replay)) == 8  # a 404 is permanent: each failed file was asked for once


@pytest.mark.parametrize("style", ["relative", "protocol-relative"])
def test_relative_file_urls_are_resolved_against_the_site(tmp_path, kit, style):
    with _replay(kit, count=3, file_urls=style) as replay:
        assert replay.file_url(replay.posts[0]).startswith("/")
        posts, counts = crawl(_settings(replay), tmp_path, SilentProgress())
    assert len(posts) == 3 and counts["downloaded"] == 3


def test_unsupported_url_scheme_is_not_retried(kit, monkeypatch):
    waits = []

    async def backoff(client, attempt, wait_hint):
        waits.append(attempt)

    async def go():
        http = httpx.AsyncClient()
        client = SiteClient("danbooru", http, RateLimit(1000, 2), 5)
        async with http:
            with pytest.raises(StageError, match="cannot fetch this URL"):
                await client.get("ftp://127.0.0.1/file.png")

    monkeypatch.setattr(SiteClient, "_backoff", backoff)
    asyncio.run(go())
    assert waits == []  # a retry waits first


def test_downloads_are_checked_against_the_sites_md5(tmp_path, kit):
    impostor = sorted(kit.images.glob("main_*.png"))[-1].read_bytes()  # a valid image, not the post's
    for wrong, kept in ((2, 1), (4, 0)):  # retried, then dropped after max_retries
        with _replay(kit, count=1) as replay:
            replay.data_faults += [(200, {"Content-Type": "image/png"}, impostor)] * wrong
            settings = _settings(replay, more=["crawl.max_retries=3"])
            if kept:
                posts, counts = crawl(settings, tmp_path / str(wrong), SilentProgress())
                assert (
                    len(posts) == 1 and file_md5(tmp_path / str(wrong) / "images" / posts[0].filename) == posts[0].md5
                )
            else:
                with pytest.raises(InputError, match="no usable images"):
                    crawl(settings, tmp_path / str(wrong), SilentProgress())
                assert not list((tmp_path / str(wrong) / "images").iterdir())
        assert len(_downloads(replay)) == min(wrong + 1, 4)


def test_secrets_in_any_encoding_stay_out_of_output_and_state(tmp_path, kit, monkeypatch):
    secret = "SECRET/XYZ+123="
    monkeypatch.setenv("LORAFACTORY_DANBOORU_LOGIN", "me")
    monkeypatch.setenv("LORAFACTORY_DANBOORU_API_KEY", secret)
    with _replay(kit, count=2) as replay:
        echo = f'{{"message": "denied: /posts.json?login=me&api_key={quote_plus(secret)}"}}'.encode()
        replay.faults.append((403, {}, echo))
        args = ["crawl", "Akane", "--site", "danbooru", "--workspace", str(tmp_path / "ws")]
        args += ["--set", f'crawl.danbooru.base_url="{replay.url}"', "--set", 'crawl.tags=["akane"]']
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 4 and "HTTP 403" in result.output and "***" in result.output
    forms = {secret, quote_plus(secret), quote(secret, safe=""), quote(secret, safe="").lower()}
    stored = b"".join(p.read_bytes() for p in (tmp_path / "ws").rglob("*") if p.is_file())
    assert not any(form in result.output or form.encode() in stored for form in forms)


@pytest.mark.parametrize(
    "data", [b"\xef\xbb\xbfsailor hat, smile", "sailor hat, smile".encode("utf-16"), b"sailor_hat\nsmile\n"]
)
def test_sidecar_encodings_are_read(tmp_path, data):
    (tmp_path / "a.txt").write_bytes(data)
    assert sidecar_tags(tmp_path / "a.png") == ["sailor_hat", "smile"]


def test_a_sidecar_in_another_encoding_is_refused_by_name(tmp_path):
    (tmp_path / "a.txt").write_bytes("caf\xe9, smile".encode("latin-1"))
    with pytest.raises(InputError, match=r"tag file .*a\.txt is not UTF-8 or UTF-16 text; save it as UTF-8"):
        sidecar_tags(tmp_path / "a.png")


class _RecordingBudget:
    """A shared budget as a fleet's actor keeps it, in this process: books starts, records the calls."""

    def __init__(self) -> None:
        from lorafactory.fleet.budget import SiteBudgets

        self.books, self.calls = SiteBudgets(), []

    async def reserve(self, site, interval):
        self.calls.append(("reserve", site, interval))
        return self.books.reserve(site, interval) - time.time()  # as the fleet's RayBudget answers

    def pause(self, site, seconds):
        self.calls.append(("pause", site, seconds))
        self.books.pause(site, seconds)


def test_a_shared_budget_books_every_request_and_hears_every_pause(tmp_path, kit):
    budget = _RecordingBudget()
    with _replay(kit, count=4) as replay:
        replay.data_faults.append((429, {"Retry-After": "0.3"}, b"slow down"))
        posts, _ = crawl(_settings(replay, rps=50), tmp_path, SilentProgress(), budget=budget)
    reserved = [call for call in budget.calls if call[0] == "reserve"]
    assert len(posts) == 4 and len(reserved) >= len(replay.requests)  # every request went through the budget
    assert {(site, interval) for _, site, interval in reserved} == {("danbooru", 1 / 50)}
    assert ("pause", "danbooru", 0.3) in budget.calls  # the server's pause reaches every worker's budget


def test_site_budgets_space_requests_and_pause_the_site():
    from lorafactory.fleet.budget import SiteBudgets

    books = SiteBudgets()
    before = time.time()
    starts = [books.reserve("danbooru", 0.5) for _ in range(3)]  # booked moments, wall clock
    assert before <= starts[0] <= time.time()
    assert starts[1] == pytest.approx(starts[0] + 0.5) and starts[2] == pytest.approx(starts[0] + 1.0)
    before = time.time()
    assert before <= books.reserve("gelbooru", 0.5) <= time.time()  # every site has its own budget
    before = time.time()
    books.pause("gelbooru", 5)
    after = time.time()
    assert before + 5 <= books.reserve("gelbooru", 0.5) <= after + 5


def test_a_booking_answered_too_late_is_made_again():
    """A shared budget whose answer arrives after the booked moment (a busy machine): the request is
    not sent at once, where it would crowd the next booking, but booked again."""
    from lorafactory.sources.http import RateLimit

    class Late:
        def __init__(self) -> None:
            self.answers = [-1.0, 0.0]

        async def reserve(self, site, interval):
            return self.answers.pop(0)

        def pause(self, site, seconds):
            pass

    budget = Late()

    async def one_request() -> None:
        async with RateLimit(10, 1, "danbooru", budget):
            pass

    asyncio.run(one_request())
    assert budget.answers == []  # both bookings were asked for


def test_an_unreachable_shared_budget_leaves_the_crawl_its_own_pace(tmp_path, kit):
    class Gone:
        async def reserve(self, site, interval):
            raise ConnectionError("the budget's node is gone")

        def pause(self, site, seconds):
            raise ConnectionError("the budget's node is gone")

    with _replay(kit, count=4) as replay:
        posts, _ = crawl(_settings(replay, rps=8), tmp_path, SilentProgress(), budget=Gone())
    assert len(posts) == 4 and _paced(sorted(t for t, _ in replay.requests), 8)


def test_files_that_landed_before_a_kill_are_not_fetched_again(tmp_path, kit):
    """A run killed between a file's landing and its archive record: the rerun checks the file
    against the site's md5 and keeps it instead of downloading it again."""
    with _replay(kit, count=4) as replay:
        crawl(_settings(replay), tmp_path, SilentProgress(), MemoryArchive())
        fetched = len(_downloads(replay))
        posts, counts = crawl(_settings(replay), tmp_path, SilentProgress(), MemoryArchive())  # no records
    assert fetched == 4 and len(_downloads(replay)) == 4  # nothing fetched twice
    assert len(posts) == 4 and counts["from_archive"] == 4 and counts.get("downloaded", 0) == 0


def test_site_adapters_cap_their_page_size_and_send_their_own_headers():
    from lorafactory.sources.crawl import SITES

    expected = {"gelbooru": 100, "rule34": 100, "yandere": 100, "sankaku": 100, "zerochan": 250, "danbooru": 500}
    for site, page_size in expected.items():
        client = SiteClient(site, httpx.AsyncClient(), RateLimit(1, 1), 0, headers={"User-Agent": "ua"})
        adapter = SITES[site][0](client, "https://example.org/", 500, site, ("user", "key"))
        assert (adapter.page_size, adapter.base_url, adapter.name) == (page_size, "https://example.org", site)
        assert adapter.auth == ("user", "key") and client.headers["User-Agent"] == "ua"
    client = SiteClient("sankaku", httpx.AsyncClient(), RateLimit(1, 1), 0)
    SITES["sankaku"][0](client, "https://example.org", 40, "sankaku")
    assert client.headers == {"Accept": "application/vnd.sankaku.api+json;v=2"}  # its v2 API's responses
    client = SiteClient("pixiv", httpx.AsyncClient(), RateLimit(1, 1), 0)
    SITES["pixiv"][0](client, "https://example.org", 40, "pixiv")
    assert client.headers == {"Referer": "https://app-api.pixiv.net/"}  # as the pixiv app sends
