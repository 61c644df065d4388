"""Procedural "moving sprites" videos: a training set whose continuations can be checked.

Every clip is a background (solid colour or linear two-colour gradient, desaturated) with a few saturated discs
and squares that move at constant velocity and bounce elastically off the walls. The physics is exact and the
ground truth (positions, velocities) is returned with the frames, so a generated continuation can be compared
with the true one (``ca2vdm.server.train.tracking``).

Coordinates are (y, x) with pixel (i, j) centred at (i, j): a frame spans [-0.5, H - 0.5] x [-0.5, W - 0.5]. A
sprite of radius r (half side for squares) stays fully inside, so its centre lies in [r - 0.5, H - 0.5 - r].
Rendering is anti-aliased with the pixel's box-filter coverage (exact for squares, close for discs), so sub-pixel
motion is visible and centroids are recoverable to a fraction of a pixel.
"""

from __future__ import annotations

import colorsys
import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SHAPES",
    "Background",
    "SceneState",
    "SpriteTruth",
    "SpritesConfig",
    "SpritesDataset",
    "render_clip",
    "render_labels",
    "render_video",
]

Shape = Literal["disc", "square"]
SHAPES: tuple[Shape, ...] = ("disc", "square")

#: Hue slots are this far apart, so sprite colours differ by >= ~180 in RGB (at full saturation and value).
_HUE_STEP = 1.0 / 6.0
#: Smallest RGB distance between a sprite colour and any background colour; keeps sprites segmentable.
MIN_BACKGROUND_DISTANCE = 110.0
#: Sizes and speeds of the defaults are for 32 px frames and scale with min(H, W).
_REFERENCE_SIZE = 32.0


@dataclass(frozen=True)
class SpritesConfig:
    """What a clip looks like. ``radius`` / ``speed`` left as None scale the 32 px defaults with min(H, W)."""

    height: int = 32
    width: int = 32
    num_frames: int = 33
    min_sprites: int = 1
    max_sprites: int = 3
    radius: tuple[float, float] | None = None  # px; None: (3, 6) at 32 px
    speed: tuple[float, float] | None = None  # px/frame; None: (0.5, 2.0) at 32 px
    antialias: bool = True

    def __post_init__(self) -> None:
        scale = min(self.height, self.width) / _REFERENCE_SIZE
        if self.radius is None:
            object.__setattr__(self, "radius", (3.0 * scale, 6.0 * scale))
        if self.speed is None:
            object.__setattr__(self, "speed", (0.5 * scale, 2.0 * scale))
        object.__setattr__(self, "radius", tuple(float(v) for v in self.radius))  # type: ignore[union-attr]
        object.__setattr__(self, "speed", tuple(float(v) for v in self.speed))  # type: ignore[union-attr]
        if self.height < 8 or self.width < 8:
            raise ValueError(f"frames must be at least 8x8, got {self.height}x{self.width}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if not 1 <= self.min_sprites <= self.max_sprites <= 6:
            raise ValueError(
                f"need 1 <= min_sprites <= max_sprites <= 6 (hue slots), got {self.min_sprites}, {self.max_sprites}"
            )
        rmin, rmax = self.radius_range
        if not 0.5 <= rmin <= rmax:
            raise ValueError(f"radius range must satisfy 0.5 <= min <= max, got {self.radius}")
        smin, smax = self.speed_range
        if not 0.0 < smin <= smax:
            raise ValueError(f"speed range must satisfy 0 < min <= max, got {self.speed}")
        room = min(self.height, self.width) - 1.0 - 2.0 * rmax  # free travel of the largest sprite
        if smax * 2.0 > room:
            # One reflection per frame and axis must suffice, and a sprite must have room to move.
            raise ValueError(
                f"largest sprite (radius {rmax}) has {room:.1f} px to travel; max speed {smax} is too "
                f"fast or the sprite too big for {self.height}x{self.width}"
            )

    @property
    def radius_range(self) -> tuple[float, float]:
        return self.radius  # type: ignore[return-value]

    @property
    def speed_range(self) -> tuple[float, float]:
        return self.speed  # type: ignore[return-value]


@dataclass(frozen=True)
class Background:
    """Solid colour (``colour0 == colour1``) or linear gradient from colour0 to colour1 along ``angle``."""

    colour0: tuple[int, int, int]
    colour1: tuple[int, int, int]
    angle: float  # radians; gradient direction (y, x) = (sin, cos)

    @property
    def is_gradient(self) -> bool:
        return self.colour0 != self.colour1

    def render(self, height: int, width: int) -> np.ndarray:
        """(H, W, 3) float32 in 0..255; affine in (y, x), which the tracker's background model relies on."""
        c0 = np.asarray(self.colour0, np.float32)
        c1 = np.asarray(self.colour1, np.float32)
        sy, sx = np.sin(self.angle), np.cos(self.angle)
        extent = abs(sy) * (height - 1) + abs(sx) * (width - 1)
        yy = np.arange(height, dtype=np.float32)[:, None] - (height - 1) / 2
        xx = np.arange(width, dtype=np.float32)[None, :] - (width - 1) / 2
        t = (yy * sy + xx * sx) / max(extent, 1e-6) + 0.5  # 0..1 across the frame
        return (c0 + (c1 - c0) * t[..., None]).astype(np.float32)


@dataclass(frozen=True, eq=False)
class SpriteTruth:
    """One sprite over a clip: its look and its per-frame centre and velocity (velocity leaving that frame)."""

    colour: tuple[int, int, int]
    shape: Shape
    radius: float  # disc radius, or half the side of a square
    positions: np.ndarray  # (T, 2) float64 (y, x) centre
    velocities: np.ndarray  # (T, 2) float64 px/frame; positions[t + 1] = reflect(positions[t] + velocities[t])

    @property
    def speed(self) -> float:
        """Speed is constant (elastic walls, no sprite-sprite collisions)."""
        return float(np.hypot(*self.velocities[0]))


@dataclass(frozen=True, eq=False)
class SceneState:
    """Ground truth of a clip, and what ``render_clip`` needs to continue it. Sprites are back to front."""

    height: int
    width: int
    background: Background
    sprites: tuple[SpriteTruth, ...]
    start_frame: int  # index of this clip's first frame in the whole video

    @property
    def num_frames(self) -> int:
        return int(self.sprites[0].positions.shape[0]) if self.sprites else 0

    @property
    def positions(self) -> np.ndarray:
        """(N, T, 2) centres, back to front."""
        return np.stack([s.positions for s in self.sprites])

    @property
    def velocities(self) -> np.ndarray:
        """(N, T, 2) velocities, back to front."""
        return np.stack([s.velocities for s in self.sprites])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2) lowest and highest centre coordinates each sprite may take (touching the walls)."""
        return _bounds([s.radius for s in self.sprites], self.height, self.width)


def _bounds(radii: list[float], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(radii, np.float64)[:, None]
    return np.repeat(r - 0.5, 2, axis=1), np.array([height, width], np.float64)[None, :] - 0.5 - r


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from colour p to the segment a-b (every colour of a two-colour gradient)."""
    ab = b - a
    t = 0.0 if not ab.any() else float(np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _sample_scene(cfg: SpritesConfig, rng: np.random.Generator) -> tuple[Background, list[tuple], np.ndarray]:
    """Scene layout: background, per-sprite (colour, shape, radius), initial (N, 2, 2) position/velocity."""
    n = int(rng.integers(cfg.min_sprites, cfg.max_sprites + 1))
    offset = rng.uniform(0.0, 1.0)
    slots = rng.permutation(6)[:n]
    colours = [_hsv(offset + _HUE_STEP * k, 1.0, 1.0) for k in slots]
    gradient = bool(rng.random() < 0.5)
    while True:  # rejection: every background colour far from every sprite colour
        c0 = _hsv(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.1, 0.6))
        c1 = _hsv(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.1, 0.6)) if gradient else c0
        a, b = np.asarray(c0, np.float64), np.asarray(c1, np.float64)
        if all(_segment_distance(np.asarray(c, np.float64), a, b) >= MIN_BACKGROUND_DISTANCE for c in colours):
            break
    background = Background(c0, c1, float(rng.uniform(0.0, 2.0 * np.pi)) if gradient else 0.0)
    rmin, rmax = cfg.radius_range
    smin, smax = cfg.speed_range
    looks, init = [], np.zeros((n, 2, 2))
    size = np.array([cfg.height, cfg.width], np.float64)
    for i in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        radius = float(rng.uniform(rmin, rmax))
        init[i, 0] = rng.uniform(radius - 0.5, size - 0.5 - radius)
        speed, angle = rng.uniform(smin, smax), rng.uniform(0.0, 2.0 * np.pi)
        init[i, 1] = speed * np.sin(angle), speed * np.cos(angle)
        looks.append((colours[i], shape, radius))
    return background, looks, init


def _simulate(p: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray, steps: int, first_step: bool):
    """Positions/velocities (N, steps, 2), one frame at a time so continuations reproduce a long run bit-exactly."""
    p, v = p.copy(), v.copy()
    ps, vs = np.empty((p.shape[0], steps, 2)), np.empty((p.shape[0], steps, 2))
    for t in range(steps):
        if t > 0 or first_step:
            p = p + v
            over, under = p > hi, p < lo
            p = np.where(over, 2.0 * hi - p, np.where(under, 2.0 * lo - p, p))
            v = np.where(over | under, -v, v)
        ps[:, t], vs[:, t] = p, v
    return ps, vs


def _coverage(shape: str, radius: float, pos: np.ndarray, height: int, width: int, antialias: bool) -> np.ndarray:
    """(T, H, W) float32 fraction of each pixel covered by the sprite."""
    dy = np.arange(height, dtype=np.float32)[None, :, None] - pos[:, 0, None, None].astype(np.float32)
    dx = np.arange(width, dtype=np.float32)[None, None, :] - pos[:, 1, None, None].astype(np.float32)
    r = np.float32(radius)
    if shape == "disc":
        dist = np.sqrt(dy * dy + dx * dx)
        if antialias:
            return np.clip(r + 0.5 - dist, 0.0, 1.0)
        return (dist <= r).astype(np.float32)
    if antialias:
        return np.clip(r + 0.5 - np.abs(dy), 0.0, 1.0) * np.clip(r + 0.5 - np.abs(dx), 0.0, 1.0)
    return ((np.abs(dy) <= r) & (np.abs(dx) <= r)).astype(np.float32)


def _render(cfg: SpritesConfig, state: SceneState) -> np.ndarray:
    img = np.broadcast_to(state.background.render(cfg.height, cfg.width), (state.num_frames, cfg.height, cfg.width, 3))
    for s in state.sprites:  # back to front: later sprites occlude earlier ones
        a = _coverage(s.shape, s.radius, s.positions, cfg.height, cfg.width, cfg.antialias)[..., None]
        img = img + a * (np.asarray(s.colour, np.float32) - img)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_clip(cfg: SpritesConfig, seed: int, start_state: SceneState | None = None) -> tuple[np.ndarray, SceneState]:
    """``cfg.num_frames`` frames (T, H, W, 3) uint8 and their ground truth, deterministic in the seed.

    With ``start_state`` (the state of a previous clip) the scene continues from the frame after its last one, and
    the seed is unused: the physics is deterministic, so chained clips equal one long render exactly.
    """
    if start_state is None:
        background, looks, init = _sample_scene(cfg, np.random.default_rng(seed))
        p, v, first_step, start = init[:, 0], init[:, 1], False, 0
    else:
        if (start_state.height, start_state.width) != (cfg.height, cfg.width):
            raise ValueError("start_state was rendered at another frame size")
        background = start_state.background
        looks = [(s.colour, s.shape, s.radius) for s in start_state.sprites]
        p, v = start_state.positions[:, -1], start_state.velocities[:, -1]
        first_step, start = True, start_state.start_frame + start_state.num_frames
    lo, hi = _bounds([radius for _, _, radius in looks], cfg.height, cfg.width)
    ps, vs = _simulate(p, v, lo, hi, cfg.num_frames, first_step)
    sprites = tuple(SpriteTruth(colour, shape, radius, ps[i], vs[i]) for i, (colour, shape, radius) in enumerate(looks))
    state = SceneState(cfg.height, cfg.width, background, sprites, start)
    return _render(cfg, state), state


def render_video(cfg: SpritesConfig, seed: int, num_frames: int) -> tuple[np.ndarray, SceneState]:
    """A long ground-truth video (e.g. 25 + 240 frames) of the scene of ``seed``; equals chained ``render_clip``s."""
    return render_clip(dataclasses.replace(cfg, num_frames=num_frames), seed)


def render_labels(state: SceneState, antialias: bool = True, threshold: float = 0.5) -> np.ndarray:
    """(T, H, W) int16: index of the front-most sprite covering each pixel by more than ``threshold``, -1 for none.

    Ground truth for visibility (occlusion) checks.
    """
    labels = np.full((state.num_frames, state.height, state.width), -1, np.int16)
    for i, s in enumerate(state.sprites):
        a = _coverage(s.shape, s.radius, s.positions, state.height, state.width, antialias)
        labels[a > threshold] = i
    return labels


class SpritesDataset(Dataset):
    """Clip i is ``render_clip(cfg, seed + i)`` as a uint8 tensor (3, T, H, W), the model's layout (the trainer
    scales to [-1, 1] on its device: a quarter of the bytes through the data-loader's shared memory).

    With ``with_background`` an item is ``(clip, background)``, the background (3, H, W) uint8 without sprites:
    what the trainer fades degraded context towards (``ca2vdm.server.train.context``)."""

    def __init__(self, cfg: SpritesConfig, length: int, seed: int = 0, with_background: bool = False) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        self.cfg, self.length, self.seed, self.with_background = cfg, length, seed, with_background

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} clips")
        frames, state = render_clip(self.cfg, self.seed + i)
        clip = torch.from_numpy(frames).permute(3, 0, 1, 2).contiguous()
        if not self.with_background:
            return clip
        background = np.clip(np.rint(state.background.render(self.cfg.height, self.cfg.width)), 0, 255)
        return clip, torch.from_numpy(background.astype(np.uint8)).permute(2, 0, 1).contiguous()
