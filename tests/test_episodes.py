"""Frames sampled per shot from synthetic episodes encoded with PyAV."""

import numpy as np
import pytest

from lorafactory.sources.episodes import EpisodeError, Sampling, sample_frames
from lorafactory.testing.episodes import BLUISH, REDDISH, Shot, write_episode

SHOTS = [
    Shot(2.0, (40, 90, 160), (0,)),
    Shot(0.8, (200, 180, 60), (1,)),
    Shot(1.5, (10, 10, 10), (), dark=True),
    Shot(4.0, (90, 160, 90), (0, 2)),
    Shot(1.0, (160, 60, 60), (3,)),
]


@pytest.fixture(scope="module")
def episode(tmp_path_factory):
    path = tmp_path_factory.mktemp("episode") / "episode_01.mp4"
    return path, write_episode(path, SHOTS)


def test_every_shot_is_found_and_sampled_a_few_times(episode):
    path, starts = episode
    frames = list(sample_frames(path))
    shots = sorted({frame.shot for frame in frames})
    first_frame_of = {shot: min(f.time for f in frames if f.shot == shot) for shot in shots}
    # every lit shot gives frames, each shot's first frame a quarter second after its true start
    lit = [start for start, shot in zip(starts, SHOTS) if not shot.dark]
    assert len(shots) == len(lit)
    for start, first in zip(lit, sorted(first_frame_of.values())):
        assert start + 0.2 <= first <= start + 0.35
    per_shot = [sum(1 for f in frames if f.shot == shot) for shot in shots]
    assert per_shot == [2, 1, 3, 1]  # 2 s, 0.8 s, 4 s (capped at 3), 1 s
    for shot in shots:
        times = [f.time for f in frames if f.shot == shot]
        assert all(later - earlier >= 0.5 for earlier, later in zip(times, times[1:]))
    assert frames[0].image.size == (320, 180)


def test_dark_frames_are_never_sampled(episode):
    path, starts = episode
    dark_start = starts[2]
    assert not [f for f in sample_frames(path) if dark_start <= f.time < dark_start + SHOTS[2].seconds]


def test_fewer_frames_per_shot_when_asked(episode):
    path, _ = episode
    assert len(list(sample_frames(path, Sampling(per_shot=1)))) == 4


def test_a_file_that_is_not_a_video_is_reported(tmp_path):
    bogus = tmp_path / "episode_02.mkv"
    bogus.write_bytes(b"\x00" * 4096)
    with pytest.raises(EpisodeError, match="episode_02.mkv: not a readable video"):
        list(sample_frames(bogus))


def test_a_truncated_episode_is_reported_not_fatal(episode, tmp_path):
    path, _ = episode
    cut = tmp_path / "episode_03.mp4"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the index (moov) is at the end
    with pytest.raises(EpisodeError, match="episode_03.mp4"):
        list(sample_frames(cut))


def test_episodes_are_extracted_one_by_one_and_resume_after_a_kill(tmp_path):
    """Two episodes and a broken one (stand-in models, set up by conftest): crops with CCIP features
    per episode; the broken one is reported and skipped; a rerun after losing the second episode's
    work redoes only that episode."""
    from lorafactory.config import load_settings
    from lorafactory.progress import SilentProgress
    from lorafactory.sources.anime import DONE, FEATURES, extract_episodes

    folder = tmp_path / "show"
    folder.mkdir()
    light = [Shot(2.0, REDDISH[0], (0,)), Shot(1.5, BLUISH[0], (1, 2)), Shot(1.5, REDDISH[1], (3,))]
    write_episode(folder / "ep01.mp4", light[:2])
    write_episode(folder / "ep02.mp4", light[1:])
    (folder / "ep03.mkv").write_bytes(b"\x00" * 4096)
    settings = load_settings(preset="tiny-demo")
    out = tmp_path / "extracted"
    first = extract_episodes(folder, out, settings, SilentProgress())
    assert first.done == ["ep01", "ep02"] and list(first.skipped) == ["ep03"]
    assert "not a readable video" in first.skipped["ep03"]
    features = np.load(out / "ep01" / FEATURES)
    crops = (out / "ep01" / "crops.jsonl").read_text().splitlines()
    assert features.shape == (len(crops), 768) and len(crops) == 2 * 1 + 2 * 2  # 2 frames of one, 2 of two characters
    finished = (out / "ep01" / DONE).stat().st_mtime_ns
    (out / "ep02" / DONE).unlink()  # killed before ep02's record was written
    second = extract_episodes(folder, out, settings, SilentProgress())
    assert second.resumed == ["ep01"] and second.done == ["ep02"] and list(second.skipped) == ["ep03"]
    assert (out / "ep01" / DONE).stat().st_mtime_ns == finished  # not decoded again


def test_a_shot_recurs_when_other_episodes_show_it():
    """An opening in every episode recurs; a shot shown in only one other episode of four does not
    (min_episodes=2); with two episodes, one other is enough; small noise still matches."""
    from lorafactory.sources.recurring import recurring_frames, recurring_shots

    rng = np.random.default_rng(0)
    opening, flashback = rng.integers(0, 255, (2, 144)), rng.integers(0, 255, (1, 144))

    def episode(*extra):
        own = rng.integers(0, 255, (3, 144))
        noisy = [np.clip(x + rng.integers(-2, 3, x.shape), 0, 255) for x in extra]
        return np.concatenate([*noisy, own]).astype(np.uint8)

    season = {"ep1": episode(opening, flashback), "ep2": episode(opening, flashback), "ep3": episode(opening)}
    season["ep4"] = episode(opening)
    found = recurring_frames(season, min_episodes=2, distance=6.0)
    assert found["ep1"].tolist() == [True, True, False, False, False, False]  # the flashback: in one other only
    assert found["ep3"].tolist() == [True, True, False, False, False]
    pair = recurring_frames({"ep1": season["ep1"], "ep2": season["ep2"]}, min_episodes=2, distance=6.0)
    assert pair["ep1"][:3].tolist() == [True, True, True]
    assert recurring_shots(np.array([0, 0, 1, 2, 2, 3]), found["ep1"]) == {0}
