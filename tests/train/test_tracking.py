"""The sprites metric: tracking recovers the ground truth; collapse is flagged; per-AR-step scores separate a right
continuation from a shuffled, noisy, blank or frozen one."""

from __future__ import annotations

import numpy as np
import pytest

from ca2vdm.server.train.sprites import SpritesConfig, render_clip, render_labels, render_video
from ca2vdm.server.train.tracking import (
    DEFAULT_TRACKER,
    compare_per_window,
    detect,
    estimate_background,
    format_table,
    high_frequency_energy,
    track,
    video_stats,
)

CFG = SpritesConfig()
SEEDS = range(30)


def _visible(state) -> np.ndarray:
    """(T, N) pixels where each sprite is the front-most one (coverage > 1/2)."""
    labels = render_labels(state)
    return np.stack([(labels == i).sum(axis=(1, 2)) for i in range(len(state.sprites))], axis=1)


@pytest.fixture(scope="module")
def clips():
    """(frames, state, tracks) of 30 ground-truth clips."""
    out = []
    for seed in SEEDS:
        frames, state = render_clip(CFG, seed)
        out.append((frames, state, track(frames)))
    return out


@pytest.fixture(scope="module")
def long_video():
    return render_video(CFG, 10, 240)[0]


@pytest.fixture(scope="module")
def self_rows(long_video):
    return compare_per_window(long_video, long_video)


def test_counts_match_the_ground_truth(clips):
    right_total = right_visible = frames_total = 0
    for _, state, tracks in clips:
        visible = _visible(state)
        right_total += int((tracks.counts == len(state.sprites)).sum())
        # slivers of 6-20 px left by an occluder may or may not be found; 20 px and more must be
        lo, hi = (visible >= 20).sum(1), (visible >= DEFAULT_TRACKER.min_area).sum(1)
        right_visible += int(((tracks.counts >= lo) & (tracks.counts <= hi)).sum())
        frames_total += len(tracks.counts)
    assert right_total / frames_total > 0.95
    assert right_visible / frames_total > 0.98


def test_centroids_of_unoccluded_sprites_within_a_pixel(clips):
    errors = []
    for _, state, tracks in clips:
        p = state.positions
        r = np.array([s.radius for s in state.sprites])
        for t, dets in enumerate(tracks.detections):
            for i, s in enumerate(state.sprites):
                clear = all(
                    np.linalg.norm(p[i, t] - p[j, t]) > 1.5 * (r[i] + r[j]) + 1 for j in range(len(r)) if j != i
                )
                if clear:
                    d = min(dets, key=lambda d: np.linalg.norm(np.subtract(d.colour, s.colour)))
                    assert np.linalg.norm(np.subtract(d.colour, s.colour)) < 20
                    errors.append(np.hypot(d.y - p[i, t, 0], d.x - p[i, t, 1]))
    assert len(errors) > 400
    assert max(errors) < 1.0 and np.mean(errors) < 0.2


def test_speeds_within_ten_percent(clips):
    checked, errors = 0, []
    for _, state, tracks in clips:
        visible = _visible(state)
        speeds, steps = tracks.speeds()
        for i, s in enumerate(state.sprites):
            same_colour = np.linalg.norm(tracks.colours - np.asarray(s.colour), axis=1) < 30
            k = int(np.argmax(np.where(same_colour, steps, -1)))  # the sprite's longest track
            errors.append(abs(speeds[k] / s.speed - 1))
            if (visible[:, i] >= 0.85 * visible[:, i].max()).mean() >= 0.8:  # in full view most of the clip
                assert errors[-1] < 0.10, (s.speed, speeds[k])
                checked += 1
    assert checked > 30
    assert np.median(errors) < 0.05  # occluded ones included


def test_background_and_single_frame_detection(clips):
    for frames, state, _ in clips[:10]:
        bg = estimate_background(frames)
        assert bg.shape == frames.shape and np.abs(bg - state.background.render(32, 32)).max() < 8
        visible = _visible(state)
        for t in (0, 16, 32):
            lo, hi = (visible[t] >= 20).sum(), (visible[t] >= DEFAULT_TRACKER.min_area).sum()
            assert lo <= len(detect(frames[t])) <= hi  # background fitted to the frame alone
            assert lo <= len(detect(frames[t], bg[t])) <= hi


def test_touching_sprites_are_not_merged():
    """Two touching sprites (front one partly covering the back one) are two objects, their blend no third."""
    for seed in SEEDS:
        frames, state = render_clip(CFG, seed)
        visible = _visible(state)
        p = state.positions
        for t in range(len(frames)):
            if len(state.sprites) >= 2 and (visible[t] >= 30).all():
                r = [s.radius for s in state.sprites]
                if np.linalg.norm(p[0, t] - p[1, t]) < r[0] + r[1]:  # overlapping
                    assert len(detect(frames[t])) == len(state.sprites), (seed, t)


def test_robust_to_mild_noise(clips):
    rng = np.random.default_rng(0)
    right = total = 0
    for frames, state, _ in clips[:12]:
        noisy = np.clip(frames + rng.normal(0, 6, frames.shape), 0, 255).astype(np.uint8)
        counts = track(noisy).counts
        right += int((counts == (_visible(state) >= 20).sum(1)).sum())
        total += len(counts)
        assert not video_stats(noisy)["is_noise"]
    assert right / total > 0.95


def test_an_imperfect_but_right_video_scores_high(long_video):
    """Blur and noise, as a generator's frames might have: still the right objects moving right."""
    f = np.pad(long_video.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = 0.4 * f[:, 1:-1, 1:-1] + 0.15 * (f[:, :-2, 1:-1] + f[:, 2:, 1:-1] + f[:, 1:-1, :-2] + f[:, 1:-1, 2:])
    noisy = blurred + np.random.default_rng(4).normal(0, 5, blurred.shape)
    rows = compare_per_window(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), long_video)
    assert np.mean([r["score"] for r in rows]) > 0.95 and min(r["score"] for r in rows) > 0.8
    assert np.nanmax([r["pos_err"] for r in rows]) < 0.5


def test_ground_truth_raises_no_collapse_flag(long_video):
    stats = video_stats(long_video, window=8)
    assert stats["counts"].shape == (240,) and len(stats["windows"]) == 30
    assert not (stats["is_blank"] or stats["is_frozen"] or stats["is_noise"])
    assert stats["blank_frac"] == stats["frozen_frac"] == stats["noise_frac"] == 0.0
    assert stats["count"] > 0 and 0.5 <= stats["mean_speed"] <= 2.0
    assert stats["max_jump"] <= 2.0 + 0.5  # full views never move faster than the fastest sprite


@pytest.mark.parametrize("kind", ["noise", "blank", "frozen"])
def test_collapse_is_flagged_and_scores_low(kind, long_video):
    rng = np.random.default_rng(1)
    video = {
        "noise": lambda: rng.integers(0, 256, long_video.shape, dtype=np.uint8),
        "blank": lambda: np.full_like(long_video, 97),
        "frozen": lambda: np.repeat(long_video[:1], len(long_video), axis=0),
    }[kind]()
    stats = video_stats(video)
    assert stats[f"is_{kind}"] and stats[f"{kind}_frac"] == 1.0
    rows = compare_per_window(video, long_video)
    assert len(rows) == 30 and max(r["score"] for r in rows) < 0.1


def test_a_frozen_stretch_is_flagged_where_it_is(long_video):
    video = long_video.copy()
    video[100:120] = video[100]
    stats = video_stats(video)
    assert stats["frozen"][100:120].all() and not stats["frozen"][:100].any() and not stats["frozen"][120:].any()
    rows = compare_per_window(video, long_video)
    assert rows[13]["score"] == 0.0 and rows[12]["frozen"] == 0.5 and rows[0]["score"] > 0.9


def test_ground_truth_against_itself_scores_high(self_rows):
    assert len(self_rows) == 30 and [r["start"] for r in self_rows] == list(range(0, 240, 8))
    for r in self_rows:
        assert r["score"] > 0.9 and 0.0 <= r["score"] <= 1.0
        assert r["gen_count"] == r["gt_count"] and r["pos_err"] == 0.0
    table = format_table(self_rows)
    assert len(table.splitlines()) == 32 and "score" in table.splitlines()[0]


def test_shuffled_frames_score_low(long_video, self_rows):
    shuffled = long_video[np.random.default_rng(2).permutation(len(long_video))]
    rows = compare_per_window(shuffled, long_video)
    assert np.mean([r["score"] for r in rows]) < 0.3 < 0.9 < np.mean([r["score"] for r in self_rows])
    assert np.median([r["gen_max_jump"] for r in rows]) > 3 * np.median([r["gt_max_jump"] for r in rows])
    assert np.mean([r["s_count"] for r in rows]) > 0.8  # the objects are all there; their motion is wrong


def test_a_missing_sprite_costs_its_share(long_video):
    """Painting one sprite out (background colour over it) lowers the count score by about 1 / N."""
    frames, state = render_video(CFG, 10, 240)
    bg = np.rint(state.background.render(32, 32)).astype(np.uint8)
    labels = render_labels(state, threshold=0.0)
    removed = np.where((labels == len(state.sprites) - 1)[..., None], bg, frames)
    rows = compare_per_window(removed, frames)
    n = len(state.sprites)
    assert n >= 2 and abs(np.mean([r["s_count"] for r in rows]) - (1 - 1 / n)) < 0.1


def test_high_frequency_energy():
    rng = np.random.default_rng(3)
    frames, _ = render_clip(CFG, 0)
    clean = high_frequency_energy(frames)
    noisy = high_frequency_energy(rng.integers(0, 256, frames.shape, dtype=np.uint8))
    assert clean.shape == (33,) and clean.max() < 5 and noisy.min() > 100


def test_input_validation(long_video):
    with pytest.raises(ValueError):
        track(long_video.astype(np.float32))
    with pytest.raises(ValueError):
        compare_per_window(long_video[:, :16], long_video)
    with pytest.raises(ValueError):
        compare_per_window(long_video, long_video[:100])
    with pytest.raises(ValueError):
        compare_per_window(long_video, long_video, window=0)
    rows = compare_per_window(long_video[:20], long_video)  # shorter generated video, last window partial
    assert [(r["start"], r["stop"]) for r in rows] == [(0, 8), (8, 16), (16, 20)]
