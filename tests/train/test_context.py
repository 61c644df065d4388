"""Imperfect training context: degraded and self-generated prefixes, and the trainer that mixes them in."""

from __future__ import annotations

import pytest
import torch

from ca2vdm.server.model.config import ModelConfig, PipelineConfig
from ca2vdm.server.model.diffusion import make_sampler
from ca2vdm.server.model.stdit import CausalSTDiT
from ca2vdm.server.train.context import degrade_prefix, rollout_prefix
from ca2vdm.server.train.sprites import SpritesConfig, SpritesDataset, render_clip, render_labels
from ca2vdm.server.train.trainer import TrainConfig, Trainer

PIPE = PipelineConfig(model=ModelConfig(input_size=(8, 16, 16), in_channels=3, hidden_size=32, depth=2, num_heads=2),
                      codec="pixel")  # fmt: skip
SPRITES = SpritesConfig(height=16, width=16, num_frames=33)


def _batch(n: int = 3, seed: int = 7):
    ds = SpritesDataset(SPRITES, length=n, seed=seed, with_background=True)
    clips, bgs = zip(*(ds[i] for i in range(n)), strict=True)
    return torch.stack(clips).float() / 127.5 - 1, torch.stack(bgs).float() / 127.5 - 1


def test_dataset_background_is_the_frame_without_sprites():
    ds = SpritesDataset(SPRITES, length=4, seed=3, with_background=True)
    clip, background = ds[2]
    assert torch.equal(clip, SpritesDataset(SPRITES, length=4, seed=3)[2])  # same clip as without the option
    assert background.shape == (3, 16, 16) and background.dtype == torch.uint8
    _, state = render_clip(SPRITES, 3 + 2)
    free = torch.from_numpy(render_labels(state, threshold=0.0) == -1)  # pixels no sprite touches
    diff = (clip.int() - background[:, None].int()).abs()
    assert free.any() and diff[:, free].max() == 0 and diff[:, ~free].max() > 50


def test_degrade_fades_sprites_towards_the_background_more_in_later_frames():
    clips, bgs = _batch()
    prefix = clips[:, :, :9]
    gen = torch.Generator().manual_seed(0)
    apply = torch.tensor([True, False, True])
    out = degrade_prefix(prefix, bgs, apply, gen, min_contrast=0.35)
    assert out.shape == prefix.shape and torch.equal(out[1], prefix[1])  # not applied: untouched
    # the blur keeps each channel's summed difference from the background (up to the replicated edges), so the
    # per-frame ratio of those sums is the contrast: falling linearly, oldest to newest, within [0.35, 1]
    sum_in = (prefix - bgs[:, :, None]).sum(dim=(3, 4))  # (B, C, P)
    sum_out = (out - bgs[:, :, None]).sum(dim=(3, 4))
    for i in (0, 2):
        ratio = (sum_out[i] * sum_in[i]).sum(0) / (sum_in[i] ** 2).sum(0)
        assert (ratio <= 1.02).all() and (ratio >= 0.33).all() and ratio[-1] < 0.99
        steps = ratio.diff()
        assert (steps <= 0.01).all() and steps.std() < 0.01  # a linear ramp down
    blurred = (out[0] - prefix[0]).abs().amax() > 0
    assert blurred
    # far from every sprite the background is untouched
    far = (prefix - bgs[:, :, None]).abs().amax(dim=(1, 2)) < 1e-6  # (B, H, W) no sprite in any prefix frame
    blurred_reach = torch.nn.functional.max_pool2d((~far).float(), 3, 1, 1) > 0
    keep = (~blurred_reach)[:, None, None].expand_as(prefix)
    assert keep.any() and torch.allclose(out[keep], prefix[keep])
    with pytest.raises(ValueError, match="background"):
        degrade_prefix(prefix, bgs[:, :, :8], apply, gen)


def _model(seed: int = 0) -> CausalSTDiT:
    return CausalSTDiT(PIPE.model).randomize_(seed).eval()


def test_rollout_keeps_the_head_and_generates_the_rest_as_recompute_would():
    """The cached rollout equals sampling every chunk by recomputing the whole (perturbed) prefix."""
    model = _model()
    clips, _ = _batch(2)
    window = clips[:, :, :25]
    sampler = make_sampler("ddim", 10, clip_x0=True)  # 10 steps: t_p = 100 perturbs (to respaced t = 111)
    out = rollout_prefix(model, window, 9, 17, 8, sampler, 100, torch.Generator().manual_seed(5))
    assert out.shape == (2, 3, 17, 16, 16) and torch.equal(out[:, :, :9], window[:, :, :9])
    assert not torch.allclose(out[:, :, 9:], window[:, :, 9:17], atol=0.05)

    gen = torch.Generator().manual_seed(5)  # the same draws in the same order: head perturbation, then chunk noise
    k = sampler.perturb_index(100)
    head = sampler.q_sample(window[:, :, :9], torch.full((2,), k), torch.randn(window[:, :, :9].shape, generator=gen))
    noise = torch.randn((2, 3, 8, 16, 16), generator=gen)
    cond = torch.cat([torch.ones(2, 9), torch.zeros(2, 8)], 1)

    def recompute(x, t):
        labels = torch.cat([torch.zeros(2, 9), t[:, None].expand(2, 8).float()], 1)
        with torch.no_grad():
            return model(torch.cat([head, x], 2), labels, cond)[:, :, 9:]

    expected = sampler.sample_loop(recompute, noise)
    torch.testing.assert_close(out[:, :, 9:], expected, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="whole chunks"):
        rollout_prefix(model, window, 9, 20, 8, sampler, 100, gen)
    # under bf16 autocast (what --rollout-bf16 does on CUDA): the same draws, bf16-close chunks
    low = rollout_prefix(model, window, 9, 17, 8, sampler, 100, torch.Generator().manual_seed(5), bf16=True)
    assert low.dtype == window.dtype and torch.equal(low[:, :, :9], window[:, :, :9])
    err = (low[:, :, 9:] - out[:, :, 9:]).norm() / out[:, :, 9:].norm()
    assert 0 < err < 0.05, err


def test_trainer_mixes_degraded_and_self_generated_context(tmp_path):
    data = SpritesDataset(SPRITES, length=64, seed=1, with_background=True)
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-3, log_every=1, ckpt_every=6, degrade_prob=0.5, rollout_prob=0.5,
                      rollout_steps=2)  # fmt: skip
    trainer = Trainer(PIPE, cfg, data, tmp_path / "run")
    trainer.ema.randomize_(1)  # generated chunks must differ from the truth to be seen
    clips, bgs = _batch(2)
    window = clips[:, :, :25]
    shown = trainer._context(None, 17, rollout=True)(window)  # no background: rollout alone
    assert shown.shape == (2, 3, 17, 16, 16) and torch.equal(shown[:, :, :9], window[:, :, :9])
    assert not torch.allclose(shown[:, :, 9:], window[:, :, 9:17], atol=0.05)
    both = trainer._context(bgs, 17, rollout=True)(window)
    assert both.shape == shown.shape and not torch.equal(both, shown)
    assert trainer._context(None, 17, rollout=False) is None  # nothing to degrade towards, no rollout: true prefix
    history = trainer.train()
    assert len(history) == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_checkpoint_keeps_adam_moments_in_bf16_and_resumes_in_fp32(tmp_path):
    data = SpritesDataset(SPRITES, length=16, seed=1)
    trainer = Trainer(PIPE, TrainConfig(steps=3, batch_size=2, log_every=1, ckpt_every=3), data, tmp_path / "run")
    trainer.train()
    saved = torch.load(tmp_path / "run" / "trainer.pt", weights_only=False)
    moments = [v for st in saved["opt"]["state"].values() for k, v in st.items() if k.startswith("exp_avg")]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)
    again = Trainer(PIPE, TrainConfig(steps=5, batch_size=2, log_every=1, ckpt_every=5), data, tmp_path / "run")
    assert again.resume() and again.step == 3
    first = next(iter(again.opt.state.values()))
    assert first["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(first["exp_avg_sq"], next(iter(trainer.opt.state.values()))["exp_avg_sq"],
                               rtol=1e-2, atol=0)  # fmt: skip
    again.train()
    assert again.step == 5
    # a state already at its target writes its model directory and trains no further (exporting a carried state)
    (tmp_path / "run" / "model" / "model.safetensors").unlink()
    export = Trainer(PIPE, TrainConfig(steps=1, batch_size=2), data, tmp_path / "run")
    assert export.resume() and export.train() == again.history and export.step == 5
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
