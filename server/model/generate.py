"""The autoregressive generation loop: condition frame -> cache -> chunk after chunk.

Each autoregression step denoises one chunk against the cache (every denoising step reads the same
cached K/V) and then writes the finished chunk into the cache with one t=0 forward. Frames written to the
cache may first be perturbed to a small noise level (the reference's prefix perturbation, t_p = 50 of
1000), which the model was trained with to tolerate its own accumulated errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from .cache import DenseKVCache
from .codecs import frames_to_uint8, uint8_to_frames
from .diffusion import Sampler
from .loader import Pipeline


def perturb_for_cache(latents: Tensor, sampler: Sampler, t_p: int, gen: torch.Generator) -> Tensor:
    """Prefix perturbation: noise clean frames to the respaced index of t_p before they are cached."""
    k = sampler.perturb_index(t_p) if t_p > 0 else None
    if k is None:
        return latents
    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
    return sampler.q_sample(latents, torch.full((latents.shape[0],), k, device=latents.device), noise)


@torch.no_grad()
def generate_clips(
    pipe: Pipeline, sampler: Sampler, *, image: Tensor | None, num_frames: int, seed: int
) -> Iterator[Tensor]:
    """Yield clips of uint8 frames (n, H, W, 3) until `num_frames` frames were produced.

    `image` (H, W, 3) uint8 at the pipeline's frame size becomes frame 0 (as the codec reconstructs it);
    without it the model's <BOV> frame seeds the cache and every frame is generated.
    """
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    cfg, model, dev = pipe.config, pipe.model, pipe.device
    if image is not None and tuple(image.shape) != (*pipe.frame_size, 3):
        raise ValueError(f"image must be {(*pipe.frame_size, 3)} uint8, got {tuple(image.shape)}")
    sampler = sampler.to(dev)
    gen = torch.Generator(dev).manual_seed(seed)
    cache = DenseKVCache.for_model(model, batch_size=1, max_frames=cfg.max_cache_frames)

    # 1. the condition frame
    if image is not None:
        first = pipe.codec.encode(uint8_to_frames(image[None, None].to(dev)))  # (1, C, 1, h, w)
        yield frames_to_uint8(pipe.codec.decode(first))[0]
        produced = 1
    else:
        first = model.bov_token[None, :, None].float()  # (1, C, 1, h, w)
        produced = 0
    model.write(cache, perturb_for_cache(first, sampler, cfg.prefix_perturb_t, gen))

    # 2. chunk after chunk
    c, (h, w) = cfg.model.in_channels, cfg.model.input_size[1:]
    while produced < num_frames:
        noise = torch.randn((1, c, cfg.chunk_frames, h, w), generator=gen, device=dev)
        chunk = sampler.sample_loop(lambda x, t: model.denoise(cache, x, t), noise, generator=gen)
        n = min(cfg.chunk_frames, num_frames - produced)
        if produced + n < num_frames:  # the last chunk's K/V would never be read
            model.write(cache, perturb_for_cache(chunk, sampler, cfg.prefix_perturb_t, gen))
        yield frames_to_uint8(pipe.codec.decode(chunk[:, :, :n]))[0]
        produced += n


def generate_video(
    pipe: Pipeline,
    sampler: Sampler,
    *,
    image: Tensor | None,
    num_frames: int,
    seed: int,
    progress: bool = False,
    on_clip: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """All frames (num_frames, H, W, 3) uint8, with an optional progress bar over frames."""
    clips = []
    with tqdm(total=num_frames, unit="frame", disable=not progress, desc="generating") as bar:
        for clip in generate_clips(pipe, sampler, image=image, num_frames=num_frames, seed=seed):
            clips.append(clip.cpu())
            bar.update(clip.shape[0])
            if on_clip is not None:
                on_clip(clip)
    return torch.cat(clips)
