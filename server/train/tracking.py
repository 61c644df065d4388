"""Is a generated sprites video right? Object tracking and collapse checks on uint8 videos (T, H, W, 3).

Nothing here sees the ground truth of a generated video: sprites are found from pixels alone, so the same numbers
are computed for a generated continuation and for the true one (``ca2vdm.server.train.sprites``) and compared per
autoregressive step.

How sprites are found: the background is a desaturated solid colour or linear gradient, so it is modelled as an
affine function of (y, x) per channel, fitted robustly (to the per-pixel temporal median of the video, then
corrected per frame so a drifting generated background does not read as objects). Pixels far from it are
foreground. A foreground pixel is a mix ``bg + a * (colour - bg)`` of the background and a saturated sprite colour
(anti-aliased edges, blur); following the ray from the background through the pixel to the edge of the RGB cube
recovers the sprite colour and ``a``, so edge pixels join their sprite and weight its centroid by coverage.
Objects are connected regions of one recovered colour, grown from sprite interiors so that touching sprites stay
apart (``_segment``). Tracks link them over frames by colour first, predicted position second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DEFAULT_TRACKER",
    "Detection",
    "FrameStats",
    "TrackerConfig",
    "Tracks",
    "compare_per_window",
    "detect",
    "estimate_background",
    "format_table",
    "frame_stats",
    "high_frequency_energy",
    "track",
    "video_stats",
]


@dataclass(frozen=True)
class TrackerConfig:
    """Thresholds, in uint8 RGB units unless said otherwise; the defaults fit ``SpritesConfig`` at 32x32."""

    fg_threshold: float = 40.0  # RGB distance from the background above which a pixel is foreground
    background_detail: float = 4.0  # the temporal median may depart this far from the affine background model
    core_distance: float = 40.0  # a pixel is sprite interior if its 4-neighbours' colours are this close to its own
    link_distance: float = 80.0  # recovered-colour distance under which 4-neighbours belong to one component
    min_area: float = 6.0  # coverage-weighted px; smaller components are noise or slivers
    merge_distance: float = 60.0  # same-colour components of one frame closer than merge_radius are one object
    merge_radius: float = 14.0  # px
    colour_gate: float = 110.0  # largest colour distance for linking a detection to a track
    max_gap: int = 3  # frames a track may go undetected (occlusion) and still continue
    blank_std: float = 3.0  # a frame whose spatial std (mean over channels) is below this is blank
    frozen_delta: float = 16.0  # a pixel "changed" if some channel moved more than this
    frozen_pixels: int = 2  # frames with fewer changed pixels than this are identical
    frozen_run: int = 4  # this many identical consecutive frames make them frozen
    noise_level: float = 40.0  # median |Laplacian| per frame above which it is noise (ground truth: ~0-2)
    noise_factor: float = 4.0  # ... or above this times the ground truth's, when one is given


DEFAULT_TRACKER = TrackerConfig()


@dataclass(frozen=True)
class Detection:
    """One sprite in one frame. Centroid and area are weighted by estimated pixel coverage."""

    y: float
    x: float
    area: float  # coverage-weighted pixel count
    colour: tuple[float, float, float]  # estimated sprite colour (background unmixed), RGB 0..255
    pixels: int  # foreground pixels in the component(s)


@dataclass(eq=False)
class Tracks:
    """Detections linked over time. Track k's centre in frame t is ``positions[k, t]`` (NaN where not seen)."""

    detections: list[list[Detection]]  # per frame
    positions: np.ndarray  # (K, T, 2)
    areas: np.ndarray  # (K, T) detection areas, NaN where not seen
    colours: np.ndarray  # (K, 3) mean colour of the track's detections
    steps: np.ndarray = field(init=False)  # (K, T) px/frame moved into frame t (over gaps: distance / gap)
    clean: np.ndarray = field(init=False)  # (K, T) step between two full views (area near the track's largest)

    #: A view is full if its area is at least this fraction of the track's 90th-percentile area; partly occluded
    #: sprites have their visible part's centroid, which moves differently from the sprite.
    FULL_VIEW = 0.85

    def __post_init__(self) -> None:
        k, t = self.positions.shape[:2]
        self.steps = np.full((k, t), np.nan)
        self.clean = np.zeros((k, t), bool)
        for i in range(k):
            seen = np.flatnonzero(~np.isnan(self.positions[i, :, 0]))
            if seen.size > 1:
                gap = np.diff(seen)
                dist = np.linalg.norm(np.diff(self.positions[i, seen], axis=0), axis=-1)
                self.steps[i, seen[1:]] = dist / gap
                full = self.areas[i, seen] >= self.FULL_VIEW * np.quantile(self.areas[i, seen], 0.9)
                self.clean[i, seen[1:]] = full[1:] & full[:-1]

    def speeds(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(K,) each track's speed in frames [start, stop), the median of its steps there (over full views where
        there are any; NaN if it made no step), and (K,) its number of steps."""
        steps, clean = self.steps[:, start:stop], self.clean[:, start:stop]
        seen = ~np.isnan(steps)
        speeds = np.full(len(steps), np.nan)
        for k in np.flatnonzero(seen.any(axis=1)):
            speeds[k] = np.median(steps[k][clean[k]] if clean[k].any() else steps[k][seen[k]])
        return speeds, seen.sum(axis=1)

    @property
    def counts(self) -> np.ndarray:
        """(T,) number of detections per frame."""
        return np.array([len(d) for d in self.detections], np.int64)

    def __len__(self) -> int:
        return int(self.positions.shape[0])


# ---------------------------------------------------------------------------------------------------- background


def _design(height: int, width: int) -> np.ndarray:
    """(H*W, 3) [1, y, x] with centred, unit-range coordinates (well conditioned)."""
    yy, xx = np.meshgrid(
        (np.arange(height) - (height - 1) / 2) / height, (np.arange(width) - (width - 1) / 2) / width, indexing="ij"
    )
    return np.stack([np.ones(height * width), yy.ravel(), xx.ravel()], axis=1)


def _robust_affine(img: np.ndarray, tol: float) -> np.ndarray:
    """Affine-in-(y, x) fit of an (H, W, 3) image ignoring outliers (sprites): trimmed, then thresholded, LS."""
    h, w, _ = img.shape
    a = _design(h, w)
    y = img.reshape(-1, 3).astype(np.float64)
    keep = np.ones(h * w, bool)
    for it in range(8):
        coef, *_ = np.linalg.lstsq(a[keep], y[keep], rcond=None)
        res = np.linalg.norm(y - a @ coef, axis=1)
        cut = np.quantile(res, 0.5) if it < 2 else max(tol, float(np.quantile(res, 0.25)))
        new = res <= cut
        if np.array_equal(new, keep):
            break
        keep = new
    return (a @ coef).reshape(h, w, 3)


def _per_frame_correction(video: np.ndarray, base: np.ndarray, tol: float) -> np.ndarray:
    """(T, H, W, 3) background: ``base`` plus a per-frame affine correction fitted on background-like pixels."""
    t, h, w, _ = video.shape
    a = _design(h, w)  # (P, 3)
    res = video.reshape(t, h * w, 3).astype(np.float64) - base.reshape(1, h * w, 3)
    corr = np.zeros_like(res)
    for _ in range(2):
        wgt = (np.linalg.norm(res - corr, axis=-1) < tol).astype(np.float64)  # (T, P)
        ata = np.einsum("tp,pi,pj->tij", wgt, a, a, optimize=True) + 1e-6 * np.eye(3)
        atb = np.einsum("tp,pi,tpc->tic", wgt, a, res, optimize=True)
        coef = np.linalg.solve(ata, atb)  # (T, 3, 3)
        corr = np.einsum("pi,tic->tpc", a, coef)
    return (base.reshape(1, h * w, 3) + corr).reshape(t, h, w, 3)


def estimate_background(video: np.ndarray, cfg: TrackerConfig = DEFAULT_TRACKER) -> np.ndarray:
    """(T, H, W, 3) float background of each frame of a (T, H, W, 3) uint8 video.

    The temporal median is the background wherever sprites pass by; where a slow or stuck sprite dominates a pixel
    the robust affine fit of the median takes over. A per-frame affine correction follows global drift.
    """
    video = _check_video(video)
    med = np.median(video, axis=0)
    fit = _robust_affine(med, cfg.fg_threshold / 2)
    base = np.where(np.linalg.norm(med - fit, axis=-1, keepdims=True) < cfg.background_detail, med, fit)
    return _per_frame_correction(video, base, cfg.fg_threshold)


# ---------------------------------------------------------------------------------------------------- detection


def _label(fg: np.ndarray, link_h: np.ndarray, link_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the foreground of (T, H, W), joined where ``link_*``: (flat pixel ids, root ids).

    Union-find over the edge list, vectorised: hook larger roots onto smaller, then compress fully; the number of
    rounds grows with log(component size), not its diameter.
    """
    t, h, w = fg.shape
    flat = np.arange(t * h * w).reshape(t, h, w)
    ids = np.flatnonzero(fg)
    compact = np.full(t * h * w, -1, np.int64)
    compact[ids] = np.arange(ids.size)
    a = compact[np.concatenate([flat[:, :, :-1][link_h], flat[:, :-1, :][link_v]])]
    b = compact[np.concatenate([flat[:, :, 1:][link_h], flat[:, 1:, :][link_v]])]
    parent = np.arange(ids.size)
    while a.size:
        pa, pb = parent[a], parent[b]
        open_ = pa != pb
        if not open_.any():
            break
        a, b, pa, pb = a[open_], b[open_], pa[open_], pb[open_]
        np.minimum.at(parent, np.maximum(pa, pb), np.minimum(pa, pb))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return ids, parent


def _shift(x: np.ndarray, dy: int, dx: int, fill: float | bool | int) -> np.ndarray:
    """x[:, i + dy, j + dx] at (i, j) of a (T, H, W, ...) array, ``fill`` beyond the frame."""
    pad = [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 3)
    h, w = x.shape[1:3]
    return np.pad(x, pad, constant_values=fill)[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


_NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def _components(mask: np.ndarray, colour: np.ndarray, link: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Components of ``mask`` (T, H, W) whose 4-neighbours differ in colour by < ``link``: flat pixel ids,
    component index per id, (N, 3) mean colour per component."""
    ids, comp = _components_ids(mask, colour, link)
    return ids, comp, _mean_colour(ids, comp, colour)


def _mean_colour(ids: np.ndarray, comp: np.ndarray, colour: np.ndarray) -> np.ndarray:
    n = int(comp.max()) + 1 if comp.size else 0
    flat = colour.reshape(-1, 3)[ids]
    mean = np.stack([np.bincount(comp, flat[:, c], n) for c in range(3)], axis=1).reshape(n, 3)
    return mean / np.maximum(np.bincount(comp, minlength=n), 1)[:, None]


def _components_ids(mask: np.ndarray, colour: np.ndarray, link: float) -> tuple[np.ndarray, np.ndarray]:
    near = lambda u, v: np.linalg.norm(u - v, axis=-1) < link  # noqa: E731
    link_h = mask[:, :, :-1] & mask[:, :, 1:] & near(colour[:, :, :-1], colour[:, :, 1:])
    link_v = mask[:, :-1, :] & mask[:, 1:, :] & near(colour[:, :-1, :], colour[:, 1:, :])
    ids, root = _label(mask, link_h, link_v)
    return ids, np.unique(root, return_inverse=True)[1].reshape(-1)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from colour p to the segment a-b (the colours of blends of a and b)."""
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(float(np.dot(ab, ab)), 1e-9), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _segment(
    fg: np.ndarray, colour: np.ndarray, pixel: np.ndarray, cfg: TrackerConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W) component label per pixel (-1: none) and (N, 3) component colours.

    Chains of similar neighbours would bridge two touching sprites through the gradual colour blend along their
    boundary, so components grow from cores instead: pixels whose 4-neighbours all share their colour (sprite
    interiors). Core components never touch across a boundary; each then takes in the foreground pixels next to it
    whose colour is close to its own, two rings deep. What is left (slivers of occluded sprites, too thin for a
    core) forms components of its own.
    """
    core = fg.copy()
    for dy, dx in _NEIGHBOURS:
        near = np.linalg.norm(_shift(colour, dy, dx, 0.0) - colour, axis=-1) < cfg.core_distance
        core &= _shift(fg, dy, dx, False) & near
    labels = np.full(fg.shape, -1, np.int64)
    core_ids, core_comp, comp_colour = _components(core, colour, cfg.link_distance)
    labels.reshape(-1)[core_ids] = core_comp
    for _ in range(2 if len(comp_colour) else 0):  # grow into the rim: anti-aliased edges, blends go to the nearest
        grown, best = labels.copy(), np.full(fg.shape, np.inf)
        free = fg & (labels < 0)
        for dy, dx in _NEIGHBOURS:
            cand = _shift(labels, dy, dx, -1)
            dist = np.linalg.norm(comp_colour[np.maximum(cand, 0)] - colour, axis=-1)
            take = free & (cand >= 0) & (dist < cfg.link_distance) & (dist < best)
            grown = np.where(take, cand, grown)
            best = np.where(take, dist, best)
        labels = grown
    n_core = len(comp_colour)
    ids, comp, more = _components(fg & (labels < 0), colour, cfg.link_distance)
    blend = np.zeros(len(more), bool)
    if ids.size and n_core > 1:
        # Drop leftovers between two sprites whose pixels (not unmixed: a blend of two sprites is no mix with the
        # background) lie between theirs: the blend along their shared boundary, not an object.
        rest = np.full(fg.shape, -1, np.int64)
        rest.reshape(-1)[ids] = comp
        pairs = [
            np.stack([rest[m], nb[m]], axis=1)
            for dy, dx in _NEIGHBOURS
            for nb in [_shift(labels, dy, dx, -1)]
            for m in [(rest >= 0) & (nb >= 0)]
        ]
        touching: dict[int, list[int]] = {}
        for r, c in np.unique(np.concatenate(pairs), axis=0):
            touching.setdefault(int(r), []).append(int(c))
        core_pixel = _mean_colour(core_ids, core_comp, pixel)
        rest_pixel = _mean_colour(ids, comp, pixel)
        for r, cs in touching.items():
            blend[r] = any(
                _segment_distance(rest_pixel[r], core_pixel[a], core_pixel[b]) < cfg.link_distance / 2
                for i, a in enumerate(cs)
                for b in cs[i + 1 :]
            )
    labels.reshape(-1)[ids] = np.where(blend[comp], -1, comp + n_core)
    return labels, np.concatenate([comp_colour, more])


def _detect_all(video: np.ndarray, background: np.ndarray, cfg: TrackerConfig) -> list[list[Detection]]:
    t, h, w, _ = video.shape
    f = video.astype(np.float32)
    bg = np.clip(background.astype(np.float32), 0.0, 255.0)
    d = f - bg
    fg = np.linalg.norm(d, axis=-1) > cfg.fg_threshold
    # Unmix: the ray bg + s * d leaves the RGB cube at s_exit >= 1; the sprite colour is there, coverage 1 / s_exit.
    with np.errstate(divide="ignore", invalid="ignore"):
        s_up = np.where(d > 0, (255.0 - bg) / d, np.inf)
        s_down = np.where(d < 0, -bg / d, np.inf)
    s_exit = np.maximum(np.minimum(s_up, s_down).min(axis=-1), 1.0)
    s_exit = np.where(fg, s_exit, 1.0)
    colour = bg + s_exit[..., None] * d
    alpha = 1.0 / s_exit
    labels, comp_colour = _segment(fg, colour, f, cfg)
    out: list[list[Detection]] = [[] for _ in range(t)]
    ids = np.flatnonzero(labels >= 0)
    if ids.size == 0:
        return out
    comp = labels.reshape(-1)[ids]
    n = len(comp_colour)
    frame_of = ids // (h * w)
    yy, xx = (ids % (h * w)) // w, ids % w
    a = alpha.reshape(-1)[ids]
    area = np.bincount(comp, a, n)
    keep = area >= cfg.min_area / 2  # halves may still merge below
    if not keep.any():
        return out
    cy = np.bincount(comp, a * yy, n)
    cx = np.bincount(comp, a * xx, n)
    col = np.stack([np.bincount(comp, a * colour.reshape(-1, 3)[ids, c], n) for c in range(3)], axis=1)
    pix = np.bincount(comp, minlength=n)
    fr = np.zeros(n, np.int64)
    fr[comp] = frame_of
    for k in np.flatnonzero(keep):
        c = tuple(float(v) for v in col[k] / area[k])
        out[fr[k]].append(Detection(float(cy[k] / area[k]), float(cx[k] / area[k]), float(area[k]), c, int(pix[k])))
    return [[d for d in _merge(dets, cfg) if d.area >= cfg.min_area] for dets in out]


def _merge(dets: list[Detection], cfg: TrackerConfig) -> list[Detection]:
    """One sprite split by an occluder (or by a crack in a generated frame) is one object: merge same-colour pieces."""
    dets = sorted(dets, key=lambda d: -d.area)
    merged: list[Detection] = []
    for d in dets:
        for i, m in enumerate(merged):
            close = np.hypot(d.y - m.y, d.x - m.x) < cfg.merge_radius
            if close and np.linalg.norm(np.subtract(d.colour, m.colour)) < cfg.merge_distance:
                area = m.area + d.area
                wm, wd = m.area / area, d.area / area
                colour = tuple(wm * p + wd * q for p, q in zip(m.colour, d.colour, strict=True))
                merged[i] = Detection(wm * m.y + wd * d.y, wm * m.x + wd * d.x, area, colour, m.pixels + d.pixels)
                break
        else:
            merged.append(d)
    return merged


def detect(
    frame: np.ndarray, background: np.ndarray | None = None, cfg: TrackerConfig = DEFAULT_TRACKER
) -> list[Detection]:
    """Sprites in one (H, W, 3) uint8 frame. ``background`` (H, W, 3): e.g. ``estimate_background(video)[t]``;
    without it, a robust affine fit of this frame alone (fine when sprites cover well under half of it)."""
    frame = _check_video(np.asarray(frame)[None])
    bg = _robust_affine(frame[0].astype(np.float64), cfg.fg_threshold / 2) if background is None else background
    return _detect_all(frame, np.asarray(bg, np.float32)[None], cfg)[0]


# ---------------------------------------------------------------------------------------------------- tracking


def _link(detections: list[list[Detection]], size: tuple[int, int], cfg: TrackerConfig) -> Tracks:
    """Greedy frame-to-frame assignment; colour first (sprites have distinct colours), predicted position second."""
    t_len = len(detections)
    pos_scale = max(size) / 4.0
    tracks: list[dict] = []  # last_t, pos, vel, colour (sum), n, seen {t: ((y, x), area)}
    for t, dets in enumerate(detections):
        live = [k for k, tr in enumerate(tracks) if t - tr["last_t"] <= cfg.max_gap + 1]
        pairs = []
        for k in live:
            tr = tracks[k]
            pred = tr["pos"] + tr["vel"] * (t - tr["last_t"])
            mean_colour = tr["colour"] / tr["n"]
            for j, d in enumerate(dets):
                cd = float(np.linalg.norm(np.asarray(d.colour) - mean_colour))
                if cd <= cfg.colour_gate:
                    pd = float(np.hypot(d.y - pred[0], d.x - pred[1]))
                    pairs.append((cd / cfg.colour_gate + pd / pos_scale, k, j))
        pairs.sort()
        used_k: set[int] = set()
        used_j: set[int] = set()
        for _, k, j in pairs:
            if k in used_k or j in used_j:
                continue
            used_k.add(k)
            used_j.add(j)
            tr, d = tracks[k], dets[j]
            p = np.array([d.y, d.x])
            tr["vel"] = (p - tr["pos"]) / (t - tr["last_t"])
            tr["pos"], tr["last_t"] = p, t
            tr["colour"] = tr["colour"] + np.asarray(d.colour)
            tr["n"] += 1
            tr["seen"][t] = (p, d.area)
        for j, d in enumerate(dets):
            if j not in used_j:
                p = np.array([d.y, d.x])
                tr = {"last_t": t, "pos": p, "vel": np.zeros(2), "colour": np.asarray(d.colour), "n": 1}
                tracks.append(tr | {"seen": {t: (p, d.area)}})
    positions = np.full((len(tracks), t_len, 2), np.nan)
    areas = np.full((len(tracks), t_len), np.nan)
    for k, tr in enumerate(tracks):
        for t, (p, area) in tr["seen"].items():
            positions[k, t], areas[k, t] = p, area
    colours = np.array([tr["colour"] / tr["n"] for tr in tracks]).reshape(-1, 3)
    return Tracks(detections, positions, areas, colours)


def track(video: np.ndarray, cfg: TrackerConfig = DEFAULT_TRACKER, background: np.ndarray | None = None) -> Tracks:
    """Detect sprites in every frame of a (T, H, W, 3) uint8 video and link them into tracks."""
    video = _check_video(video)
    bg = estimate_background(video, cfg) if background is None else np.broadcast_to(background, video.shape)
    return _link(_detect_all(video, bg, cfg), video.shape[1:3], cfg)


# ---------------------------------------------------------------------------------------------------- statistics


def high_frequency_energy(video: np.ndarray) -> np.ndarray:
    """(T,) median over interior pixels of |discrete Laplacian| (mean over channels). Piecewise-smooth frames give
    ~0 (edges are a minority of pixels), noise gives ~3.4 sigma."""
    v = _check_video(video).astype(np.float32)
    lap = 4 * v[:, 1:-1, 1:-1] - v[:, :-2, 1:-1] - v[:, 2:, 1:-1] - v[:, 1:-1, :-2] - v[:, 1:-1, 2:]
    return np.median(np.abs(lap).mean(axis=-1).reshape(v.shape[0], -1), axis=1)


@dataclass(eq=False)
class FrameStats:
    """Per-frame measurements of one video, summarised over any window by ``summary``."""

    tracks: Tracks
    counts: np.ndarray  # (T,) objects per frame
    hf: np.ndarray  # (T,) high_frequency_energy
    blank: np.ndarray  # (T,) bool
    frozen: np.ndarray  # (T,) bool
    noise: np.ndarray  # (T,) bool

    def summary(self, start: int = 0, stop: int | None = None) -> dict:
        """Stats of frames [start, stop); motion includes the step into ``start`` (AR-step boundaries matter)."""
        stop = len(self.counts) if stop is None else stop
        counts = self.counts[start:stop]
        steps = self.tracks.steps[:, start:stop]
        speeds, _ = self.tracks.speeds(start, stop)
        per_track = [float(v) for v in speeds if not np.isnan(v)]
        changes = np.diff(self.counts[max(start - 1, 0) : stop]) != 0
        finite = steps[~np.isnan(steps)]
        clean = steps[self.tracks.clean[:, start:stop]]
        return {
            "frames": int(stop - start),
            "count": float(counts.mean()) if counts.size else 0.0,
            "count_min": int(counts.min()) if counts.size else 0,
            "count_max": int(counts.max()) if counts.size else 0,
            "count_change_frac": float(changes.mean()) if changes.size else 0.0,
            "mean_speed": float(np.mean(per_track)) if per_track else 0.0,
            "track_speeds": per_track,
            "max_jump": float(clean.max()) if clean.size else 0.0,
            "max_jump_any": float(finite.max()) if finite.size else 0.0,
            "blank_frac": float(self.blank[start:stop].mean()),
            "frozen_frac": float(self.frozen[start:stop].mean()),
            "noise_frac": float(self.noise[start:stop].mean()),
            "is_blank": bool(self.blank[start:stop].mean() > 0.5),
            "is_frozen": bool(self.frozen[start:stop].mean() > 0.5),
            "is_noise": bool(self.noise[start:stop].mean() > 0.5),
            "hf": float(np.median(self.hf[start:stop])),
        }


def frame_stats(
    video: np.ndarray, cfg: TrackerConfig = DEFAULT_TRACKER, reference_hf: float | None = None
) -> FrameStats:
    """Track ``video`` and flag collapse per frame. ``reference_hf``: the ground truth's typical
    ``high_frequency_energy``; noise is flagged above ``max(noise_level, noise_factor * reference_hf)``."""
    video = _check_video(video)
    tracks = track(video, cfg)
    hf = high_frequency_energy(video)
    blank = video.reshape(video.shape[0], -1, 3).astype(np.float32).std(axis=1).mean(axis=1) < cfg.blank_std
    changed = (np.abs(np.diff(video.astype(np.int16), axis=0)).max(axis=-1) > cfg.frozen_delta).sum(axis=(1, 2))
    same = np.concatenate([[False], changed < cfg.frozen_pixels])  # same[t]: frame t equals frame t - 1
    frozen = np.zeros(len(video), bool)
    run = 0
    for t in range(len(video)):  # runs of >= frozen_run identical frames (frozen_run - 1 "same" in a row)
        run = run + 1 if same[t] else 0
        if run >= cfg.frozen_run - 1:
            frozen[t - run : t + 1] = True
    limit = cfg.noise_level if reference_hf is None else max(cfg.noise_level, cfg.noise_factor * reference_hf)
    return FrameStats(tracks, tracks.counts, hf, blank, frozen, hf > limit)


def video_stats(video: np.ndarray, window: int | None = None, cfg: TrackerConfig = DEFAULT_TRACKER) -> dict:
    """Stats of a whole video; with ``window``, also ``windows``: the same per consecutive window of frames.

    Keys: count (mean objects per frame), count_min/max, count_change_frac (frames whose count differs from the
    previous one), mean_speed (mean over tracks of their median px/frame), track_speeds, max_jump (largest px/frame
    step of a track between two full views; occlusion moves the centroid of what is visible), max_jump_any (any
    step), blank/frozen/noise_frac and is_blank/is_frozen/is_noise (more than half the frames), hf (median);
    per frame: counts, blank, frozen, noise, per_frame_hf.
    """
    fs = frame_stats(video, cfg)
    out = fs.summary()
    out.update(counts=fs.counts, blank=fs.blank, frozen=fs.frozen, noise=fs.noise, per_frame_hf=fs.hf)
    if window is not None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        n = len(fs.counts)
        out["windows"] = [fs.summary(s, min(s + window, n)) for s in range(0, n, window)]
    return out


def _speed_score(speeds: np.ndarray, weights: np.ndarray, lo: float, hi: float, scale: float) -> float:
    """Weighted fraction of tracks moving within [lo, hi], falling off linearly over ``scale`` outside."""
    if not len(speeds):
        return 0.0
    excess = np.maximum(np.maximum(lo - speeds, speeds - hi), 0.0)
    return float(np.average(np.clip(1.0 - excess / scale, 0.0, 1.0), weights=weights))


def _position_error(gen: list[list[Detection]], truth: list[list[Detection]], cfg: TrackerConfig) -> float:
    """Mean distance (px) from each true object to the generated one of the nearest colour, NaN if none match.

    Not part of the score (a plausible continuation may drift from the true one); it shows when it does."""
    dist = []
    for g_dets, t_dets in zip(gen, truth, strict=True):
        for d in t_dets:
            colour_d = [float(np.linalg.norm(np.subtract(e.colour, d.colour))) for e in g_dets]
            if colour_d and min(colour_d) <= cfg.colour_gate:
                e = g_dets[int(np.argmin(colour_d))]
                dist.append(float(np.hypot(e.y - d.y, e.x - d.x)))
    return float(np.mean(dist)) if dist else float("nan")


def compare_per_window(
    generated: np.ndarray, ground_truth: np.ndarray, window: int = 8, cfg: TrackerConfig = DEFAULT_TRACKER
) -> list[dict]:
    """Generated vs ground-truth stats per window of ``window`` frames (one AR step), and a ``score`` in [0, 1].

    Both videos are tracked whole (tracks cross window boundaries, so a jump at an AR step boundary counts in the
    window it starts). ``generated`` may be shorter than ``ground_truth``; frame i of one must correspond to frame
    i of the other. Per window:

    * ``s_count``: per-frame agreement of the object count with the ground truth's range in the window
      (1 - distance / true count);
    * ``s_speed``: generated tracks' speeds within the ground truth's speed range (+-30 % and a little);
    * ``s_jump``: fraction of generated per-frame steps (between full views) no larger than the truth could make;
    * ``score = (1 - collapsed) * s_count * (s_speed + s_jump) / 2``, collapsed being the fraction of frames that
      are blank, frozen or noise.

    Also per window: gen_/gt_ count, mean_speed, max_jump, count_change_frac; blank/frozen/noise (fractions of
    generated frames); pos_err (px from each true object to the generated one of its colour: drift, not scored).
    """
    generated, ground_truth = _check_video(generated), _check_video(ground_truth)
    if generated.shape[1:] != ground_truth.shape[1:]:
        raise ValueError(f"frame sizes differ: {generated.shape[1:]} vs {ground_truth.shape[1:]}")
    if len(generated) > len(ground_truth):
        raise ValueError(f"generated has {len(generated)} frames, ground truth only {len(ground_truth)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    n = len(generated)
    truth = frame_stats(ground_truth[:n], cfg)
    gen = frame_stats(generated, cfg, reference_hf=float(np.median(truth.hf)))
    truth_speeds = truth.summary()["track_speeds"]
    rows = []
    for step, start in enumerate(range(0, n, window)):
        stop = min(start + window, n)
        g, t = gen.summary(start, stop), truth.summary(start, stop)
        # counts: any value the truth takes in this window is right (occlusions make it vary)
        c = gen.counts[start:stop]
        off = np.maximum(np.maximum(t["count_min"] - c, c - t["count_max"]), 0)
        s_count = float(np.mean(np.clip(1.0 - off / max(t["count_max"], 1), 0.0, 1.0)))
        # speeds: each generated track against the range of the true ones (constant, so the whole video's will do)
        t_speeds = t["track_speeds"] or truth_speeds
        g_speeds, weights = gen.tracks.speeds(start, stop)
        g_speeds, weights = g_speeds[weights > 0], weights[weights > 0]
        g_clean = gen.tracks.steps[:, start:stop][gen.tracks.clean[:, start:stop]]
        if t_speeds:
            lo, hi = min(t_speeds), max(t_speeds)
            s_speed = _speed_score(g_speeds, weights, 0.7 * lo - 0.15, 1.3 * hi + 0.3, 0.5 * hi + 0.25)
            jump_limit = max(1.5 * t["max_jump"], hi + 1.0)
            s_jump = float((g_clean <= jump_limit).mean()) if g_clean.size else 0.0
        else:  # nothing moves in the truth: right iff nothing moves in the generated video
            s_speed = s_jump = 1.0 if g["mean_speed"] < 0.25 else 0.0
        collapsed = float((gen.blank | gen.frozen | gen.noise)[start:stop].mean())
        score = (1.0 - collapsed) * s_count * (s_speed + s_jump) / 2.0
        row: dict = {"step": step, "start": start, "stop": stop}
        for key in ("count", "mean_speed", "max_jump", "count_change_frac"):
            row[f"gen_{key}"], row[f"gt_{key}"] = g[key], t[key]
        row.update(
            pos_err=_position_error(gen.tracks.detections[start:stop], truth.tracks.detections[start:stop], cfg),
            blank=g["blank_frac"],
            frozen=g["frozen_frac"],
            noise=g["noise_frac"],
            s_count=s_count,
            s_speed=s_speed,
            s_jump=s_jump,
            score=float(np.clip(score, 0.0, 1.0)),
        )
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """``compare_per_window`` rows as a fixed-width text table (one line per AR step, then the mean score)."""
    cols = [
        ("step", "step", "{:d}"),
        ("frames", None, None),
        ("gen_count", "n gen", "{:.2f}"),
        ("gt_count", "n gt", "{:.2f}"),
        ("gen_mean_speed", "v gen", "{:.2f}"),
        ("gt_mean_speed", "v gt", "{:.2f}"),
        ("gen_max_jump", "jump gen", "{:.2f}"),
        ("gt_max_jump", "jump gt", "{:.2f}"),
        ("pos_err", "pos err", "{:.2f}"),
        ("blank", "blank", "{:.2f}"),
        ("frozen", "frozen", "{:.2f}"),
        ("noise", "noise", "{:.2f}"),
        ("score", "score", "{:.3f}"),
    ]
    header = " ".join(f"{name or 'frames':>9}" for _, name, _ in cols)
    lines = [header]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            cells.append(f"{r['start']}-{r['stop']}" if key == "frames" else fmt.format(r[key]))
        lines.append(" ".join(f"{c:>9}" for c in cells))
    if rows:
        lines.append(f"mean score {np.mean([r['score'] for r in rows]):.3f} over {len(rows)} steps")
    return "\n".join(lines)


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise ValueError(f"expected a uint8 video (T, H, W, 3), got {video.dtype} {video.shape}")
    return video
