"""Moving-sprites data: determinism, ranges, exact wall bounces, occlusion order, continuation, speed, Dataset."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from ca2vdm.server.train.sprites import (
    MIN_BACKGROUND_DISTANCE,
    SHAPES,
    SceneState,
    SpritesConfig,
    SpritesDataset,
    render_clip,
    render_labels,
    render_video,
)

CFG = SpritesConfig()


def _cover(state: SceneState, i: int, t: int, full: bool) -> np.ndarray:
    """(H, W) pixels that sprite i covers entirely (anti-aliased coverage 1), or at all, in frame t."""
    s = state.sprites[i]
    dy = np.abs(np.arange(state.height)[:, None] - s.positions[t, 0])
    dx = np.abs(np.arange(state.width)[None, :] - s.positions[t, 1])
    dist = np.hypot(dy, dx) if s.shape == "disc" else np.maximum(dy, dx)
    return dist <= s.radius - 0.5 if full else dist < s.radius + 0.5


def test_config_defaults_scale_and_validate():
    assert CFG.radius_range == (3.0, 6.0) and CFG.speed_range == (0.5, 2.0)
    big = SpritesConfig(height=64, width=96)
    assert big.radius_range == (6.0, 12.0) and big.speed_range == (1.0, 4.0)
    assert SpritesConfig(radius=(2, 4), speed=(1, 1)).radius_range == (2.0, 4.0)
    for bad in (
        {"num_frames": 0},
        {"min_sprites": 0},
        {"min_sprites": 3, "max_sprites": 2},
        {"max_sprites": 7},
        {"radius": (5.0, 4.0)},
        {"speed": (0.0, 1.0)},
        {"radius": (3.0, 14.0)},  # no room to move
        {"height": 4},
    ):
        with pytest.raises(ValueError):
            SpritesConfig(**bad)


def test_deterministic_per_seed():
    a, sa = render_clip(CFG, 123)
    b, sb = render_clip(CFG, 123)
    assert np.array_equal(a, b) and np.array_equal(sa.positions, sb.positions) and sa.background == sb.background
    c, _ = render_clip(CFG, 124)
    assert not np.array_equal(a, c)


def test_shapes_dtypes_and_ranges():
    cfg = SpritesConfig(height=24, width=40, num_frames=17, min_sprites=2, max_sprites=4)
    counts, shapes, gradients = set(), set(), set()
    for seed in range(40):
        frames, state = render_clip(cfg, seed)
        assert frames.shape == (17, 24, 40, 3) and frames.dtype == np.uint8
        assert state.num_frames == 17 and state.start_frame == 0
        assert 2 <= len(state.sprites) <= 4
        counts.add(len(state.sprites))
        gradients.add(state.background.is_gradient)
        rmin, rmax = cfg.radius_range
        smin, smax = cfg.speed_range
        colours = np.array([s.colour for s in state.sprites], np.float64)
        bg = state.background.render(24, 40).reshape(-1, 3)
        for i, s in enumerate(state.sprites):
            shapes.add(s.shape)
            assert s.shape in SHAPES and rmin <= s.radius <= rmax and smin <= s.speed <= smax
            assert s.positions.shape == (17, 2) and s.velocities.shape == (17, 2) and s.positions.dtype == np.float64
            assert max(s.colour) == 255 and min(s.colour) == 0  # saturated
            assert np.linalg.norm(bg - colours[i], axis=1).min() >= MIN_BACKGROUND_DISTANCE - 1
            for j in range(i):
                assert np.linalg.norm(colours[i] - colours[j]) > 150  # far apart: hue slots 60 degrees apart
    assert counts == {2, 3, 4} and shapes == set(SHAPES) and gradients == {False, True}


def test_background_is_solid_or_a_linear_gradient():
    for seed in range(20):
        _, state = render_clip(CFG, seed)
        bg = state.background.render(32, 32)
        if not state.background.is_gradient:
            assert np.ptp(bg, axis=(0, 1)).max() == 0
        else:  # affine in (y, x): second differences vanish
            assert np.abs(np.diff(bg, 2, axis=0)).max() < 1e-3 and np.abs(np.diff(bg, 2, axis=1)).max() < 1e-3


def test_sprites_stay_inside_and_bounce_exactly_at_the_walls():
    cfg = dataclasses.replace(CFG, num_frames=150)
    flips = 0
    for seed in range(40):
        _, state = render_clip(cfg, seed)
        lo, hi = state.bounds()
        p, v = state.positions, state.velocities  # (N, T, 2)
        assert (p >= lo[:, None] - 1e-9).all() and (p <= hi[:, None] + 1e-9).all()
        # speed is constant; components only ever change sign
        assert np.allclose(np.abs(v), np.abs(v[:, :1]))
        ahead = p[:, :-1] + v[:, :-1]  # where the sprite would be without the wall
        crossed = (ahead < lo[:, None]) | (ahead > hi[:, None])
        flipped = np.sign(v[:, 1:]) != np.sign(v[:, :-1])
        assert np.array_equal(flipped, crossed), f"seed {seed}: a velocity flipped away from a wall"
        wall = np.where(ahead < lo[:, None], lo[:, None], hi[:, None])
        assert np.allclose(p[:, 1:], np.where(crossed, 2 * wall - ahead, ahead))  # mirror image in the wall
        flips += int(crossed.sum())
    assert flips > 50


def test_sprites_never_leave_the_frame_in_pixels():
    """Coverage summed over the frame is the sprite's whole area in every frame, walls included: nothing is cut."""
    cfg = SpritesConfig(num_frames=100, max_sprites=1, min_sprites=1)
    for seed in range(10):
        frames, state = render_clip(cfg, seed)
        s = state.sprites[0]
        bg = state.background.render(32, 32)
        c = np.asarray(s.colour, np.float64)
        alpha = ((frames - bg) * (c - bg)).sum(-1) / ((c - bg) ** 2).sum(-1)  # (T, H, W) unmixed coverage
        area = alpha.sum(axis=(1, 2))
        full = (2 * s.radius) ** 2 if s.shape == "square" else np.pi * s.radius**2
        assert np.allclose(area, full, rtol=0.03, atol=0.5), (s.shape, area.min(), area.max(), full)
        lo, hi = state.bounds()
        assert ((state.positions[0] - lo[0] < 1) | (hi[0] - state.positions[0] < 1)).any()  # it did reach a wall


def test_occlusion_follows_the_depth_order():
    overlaps = 0
    for seed in range(60):
        frames, state = render_clip(CFG, seed)
        n = len(state.sprites)
        for t in range(0, state.num_frames, 2):
            cover = [_cover(state, i, t, full=True) for i in range(n)]
            touch = [_cover(state, i, t, full=False) for i in range(n)]
            for i in range(n):
                for j in range(i + 1, n):
                    both = cover[i] & cover[j]
                    for k in range(j + 1, n):
                        both &= ~touch[k]  # sprite j in front of i, nothing in front of j
                    if both.any():
                        overlaps += int(both.sum())
                        assert (frames[t][both] == state.sprites[j].colour).all()  # the later (front) sprite wins
    assert overlaps > 100


def test_render_labels_match_the_frames():
    frames, state = render_clip(dataclasses.replace(CFG, antialias=False), 5)
    labels = render_labels(state, antialias=False)
    bg = np.rint(state.background.render(32, 32)).astype(np.uint8)
    for t in range(0, 33, 8):
        assert (frames[t][labels[t] < 0] == bg[labels[t] < 0]).all()
        for i, s in enumerate(state.sprites):
            assert (frames[t][labels[t] == i] == s.colour).all()


def test_continuation_equals_one_long_render():
    long_cfg = dataclasses.replace(CFG, num_frames=66)
    for seed in (0, 7, 31):
        whole, whole_state = render_clip(long_cfg, seed)
        first, s1 = render_clip(CFG, seed)
        second, s2 = render_clip(CFG, seed, start_state=s1)
        assert s2.start_frame == 33 and s2.background == s1.background
        assert np.array_equal(whole, np.concatenate([first, second]))
        assert np.array_equal(whole_state.positions, np.concatenate([s1.positions, s2.positions], axis=1))
        assert np.array_equal(whole_state.velocities, np.concatenate([s1.velocities, s2.velocities], axis=1))
    # 240 frames from eight 30-frame chunks, and render_video
    video, state = render_video(CFG, 3, 240)
    chunk_cfg = dataclasses.replace(CFG, num_frames=30)
    parts, s = [], None
    for _ in range(8):
        frames, s = render_clip(chunk_cfg, 3, start_state=s)
        parts.append(frames)
    assert video.shape == (240, 32, 32, 3) and np.array_equal(video, np.concatenate(parts)) and s.start_frame == 210
    with pytest.raises(ValueError):
        render_clip(SpritesConfig(height=48, width=48), 3, start_state=s)


def test_rendering_is_fast():
    for seed in range(5):
        render_clip(CFG, seed)
    times = []
    for seed in range(40):
        t0 = time.perf_counter()
        render_clip(CFG, seed)
        times.append(time.perf_counter() - t0)
    assert np.median(times) < 5e-3, f"median {np.median(times) * 1e3:.2f} ms per 33-frame clip"


def test_dataset_items():
    ds = SpritesDataset(CFG, length=10, seed=100)
    assert len(ds) == 10
    x = ds[3]
    assert x.shape == (3, 33, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert x.max() == 255  # saturated sprites
    frames, _ = render_clip(CFG, 103)
    expected = torch.from_numpy(frames).permute(3, 0, 1, 2)
    assert torch.equal(x, expected) and torch.equal(ds[3], x)
    assert not torch.equal(ds[4], x) and torch.equal(SpritesDataset(CFG, 10, seed=101)[2], x)
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(IndexError):
        ds[-1]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch.shape == (4, 3, 33, 32, 32)
