"""Training recipe: losses, step inputs, a CPU smoke run with checkpoint, resume and a servable model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.utils.data import Dataset

from ca2vdm.server.media import write_mp4
from ca2vdm.server.model.config import ModelConfig, PipelineConfig, get_preset
from ca2vdm.server.model.loader import load_pipeline
from ca2vdm.server.model.stdit import CausalSTDiT
from ca2vdm.server.train.losses import TrainingDiffusion
from ca2vdm.server.train.trainer import (
    TrainConfig,
    Trainer,
    init_for_training,
    prefix_lengths,
    to_model_range,
    training_step_inputs,
)
from ca2vdm.server.train.video_folder import VideoFolderDataset

PIPE = PipelineConfig(model=ModelConfig(input_size=(8, 8, 8), in_channels=3, hidden_size=32, depth=2, num_heads=2),
                      codec="pixel")  # fmt: skip


class MovingBars(Dataset):
    """A bar moving one pixel per frame: enough structure for a loss to fall."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        t = torch.arange(33)[:, None, None]
        x = torch.arange(8)[None, None, :]
        frame = ((x - (t + i) % 8).abs() < 2).float() * 2 - 1  # (T, 1, W)
        return frame.expand(33, 8, 8)[None].repeat(3, 1, 1, 1)  # (3, T, H, W)


def test_prefix_lengths():
    assert prefix_lengths(get_preset("XL/2")) == [1, 9, 17, 25]
    assert prefix_lengths(PIPE) == [1, 9, 17, 25]


def test_losses_vanish_for_a_perfect_prediction_and_respect_the_mask():
    diffusion = TrainingDiffusion()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 5, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([[0, 0, 300, 300, 300], [0, 0, 700, 700, 700]])
    x_t = diffusion.q_sample(x0, t, noise)
    mask = torch.tensor([0, 0, 1, 1, 1.0])[None, None, :, None, None].expand(2, 1, 5, 1, 1)
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # v = -1: the posterior variance exactly
    terms = diffusion.losses(perfect, x0, x_t, t, noise, mask)
    assert terms["mse"].item() < 1e-10 and abs(terms["vb"].item()) < 1e-5
    wrong_on_prefix = perfect.clone()
    wrong_on_prefix[:, :, :2] += 5.0  # predictions on conditional frames do not count
    assert torch.allclose(diffusion.losses(wrong_on_prefix, x0, x_t, t, noise, mask)["loss"], terms["loss"])
    # a wrong variance raises only the vlb term (at small t, where beta and the posterior variance differ)
    t_small = torch.tensor([[0, 0, 3, 3, 3], [0, 0, 5, 5, 5]])
    x_small = diffusion.q_sample(x0, t_small, noise)
    good = diffusion.losses(perfect, x0, x_small, t_small, noise, mask)
    worse = perfect.clone()
    worse[:, 3:, 2:] = 1.0
    bad = diffusion.losses(worse, x0, x_small, t_small, noise, mask)
    assert bad["vb"] > good["vb"] + 1e-2 and bad["mse"] < 1e-10


def test_step_inputs_follow_the_recipe():
    diffusion = TrainingDiffusion()
    clips = MovingBars()[0][None].repeat(2, 1, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    for prefix in (1, 25):
        inp = training_step_inputs(clips, prefix, 8, diffusion, TrainConfig(prefix_perturb_t=0), 33, gen)
        assert inp["x_t"].shape[2] == prefix + 8
        assert (
            (inp["t"][:, :prefix] == 0).all()
            and (inp["cond"][:, :prefix] == 1).all()
            and (inp["cond"][:, prefix:] == 0).all()
        )
        assert torch.equal(inp["x_t"][:, :, :prefix], inp["x0"][:, :, :prefix])  # clean prefix without perturbation
        assert not torch.equal(inp["x_t"][:, :, prefix:], inp["x0"][:, :, prefix:])
        if prefix + 8 < 33:
            assert inp["tpe_start"] == 0
    starts = training_step_inputs(clips, 25, 8, diffusion, TrainConfig(), 33, gen)["tpe_start"]
    assert starts.shape == (clips.shape[0],) and starts.min() >= 0 and starts.max() < 33
    draws = torch.cat([training_step_inputs(clips, 25, 8, diffusion, TrainConfig(), 33, gen)["tpe_start"]
                       for _ in range(10)])  # fmt: skip
    assert len(draws.unique()) > 3  # random cyclic offsets, per sample, once the clip fills the position table


def test_training_init_outputs_zero():
    model = init_for_training(CausalSTDiT(PIPE.model), 0)
    out = model(torch.randn(1, 3, 9, 8, 8), torch.zeros(1, 9, dtype=torch.long), torch.ones(1, 9))
    assert torch.count_nonzero(out) == 0


def test_smoke_training_resume_and_serve(tmp_path):
    cfg = TrainConfig(steps=30, batch_size=4, lr=1e-3, log_every=5, ckpt_every=20)
    trainer = Trainer(PIPE, cfg, MovingBars(), tmp_path / "run")
    history = trainer.train()
    assert [h["step"] for h in history] == [5, 10, 15, 20, 25, 30]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["mse"] < history[0]["mse"]
    again = Trainer(PIPE, TrainConfig(steps=40, batch_size=4, lr=1e-3, log_every=5, ckpt_every=20), MovingBars(),
                    tmp_path / "run")  # fmt: skip
    assert again.resume() and again.step == 30
    assert [h["step"] for h in again.train()][-2:] == [35, 40]
    pipe = load_pipeline(str(tmp_path / "run" / "model"), device="cpu")  # the EMA weights serve
    assert pipe.frame_size == (8, 8)
    assert pipe.config.prefix_perturb_t == cfg.prefix_perturb_t == 100  # generation perturbs as training did


def test_time_budget_warmup_workers_and_history(tmp_path):
    cfg = TrainConfig(steps=100_000, batch_size=4, lr=1e-3, warmup_steps=10_000, num_workers=1, log_every=1,
                      ckpt_every=100_000, max_seconds=2.0)  # fmt: skip
    trainer = Trainer(PIPE, cfg, MovingBars(), tmp_path / "run")
    history = trainer.train()
    assert 1 <= trainer.step < 1000 and history[-1]["step"] == trainer.step
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * trainer.step / 10_000)  # still warming up
    assert 0 <= history[-1]["data_wait_s"] <= history[-1]["seconds"]
    assert (tmp_path / "run" / "trainer.pt").is_file()  # stopping on the budget saves
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == history


def test_video_folder_dataset(tmp_path):
    frames = torch.randint(0, 256, (40, 24, 32, 3), dtype=torch.uint8)
    write_mp4(tmp_path / "a.mp4", frames, fps=8)
    data = VideoFolderDataset(tmp_path, size=(8, 8), num_frames=33)
    clip = data[3]
    assert clip.shape == (3, 33, 8, 8) and clip.dtype == torch.uint8
    assert torch.equal(clip, data[3])


def test_cli_train_on_a_video_folder(tmp_path):
    from ca2vdm.server.cli import main

    frames = torch.randint(0, 256, (40, 24, 32, 3), dtype=torch.uint8)
    (tmp_path / "videos").mkdir()
    write_mp4(tmp_path / "videos" / "a.mp4", frames, fps=8)
    rc = main(["train", "--preset", "tiny", "--data", str(tmp_path / "videos"), "--steps", "3", "--batch-size", "2",
               "--log-every", "1", "--device", "cpu", "--out", str(tmp_path / "run")])  # fmt: skip
    assert rc == 0 and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert main(["train", "--preset", "XL/2", "--data", "sprites", "--steps", "1", "--out", str(tmp_path / "x")]) == 2


def test_cli_train_on_sprites(tmp_path):
    from ca2vdm.server.cli import main

    args = ["--preset", "tiny", "--data", "sprites", "--steps", "2", "--batch-size", "2", "--log-every", "1"]
    rc = main(["train", *args, "--device", "cpu", "--out", str(tmp_path / "run")])
    assert rc == 0 and load_pipeline(str(tmp_path / "run" / "model"), device="cpu").frame_size == (16, 16)


def test_cli_eval_reports_model_and_truth(tmp_path, capsys):
    import json

    from ca2vdm.server.cli import main

    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", "random:tiny", "--device", "cpu", "--videos", "1", "--ar-steps", "3", "--steps", "2",
               "--out", str(out), "--sheet", str(tmp_path / "sheet.png")])  # fmt: skip
    result = json.loads(out.read_text())
    assert rc == 0 and len(result["score_per_step"]) == 3 and result["truth_score"] > 0.9
    from PIL import Image

    # 25 frames, every 12th: 3 columns of 16 px; truth above generated for the one video; 2x enlarged
    assert Image.open(tmp_path / "sheet.png").size == (3 * 16 * 2, 2 * 16 * 2)
    assert result["score"] < result["truth_score"]  # random weights do not continue sprites
    assert "mean" in capsys.readouterr().out


def test_ema_decay_warms_up():
    from ca2vdm.server.train.trainer import ema_decay_at

    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    values = [ema_decay_at(s, 0.999) for s in range(0, 20_000, 50)]
    assert values == sorted(values) and values[-1] == 0.999
    # what is left of the initial weights after 1800 steps: 16% at a fixed 0.999, well under 1% warmed up
    left = 1.0
    for s in range(1800):
        left *= ema_decay_at(s, 0.999)
    assert left < 0.01 < 0.999**1800


def test_init_from_a_model_directory(tmp_path):
    first = Trainer(PIPE, TrainConfig(steps=3, batch_size=2, ckpt_every=3), MovingBars(), tmp_path / "a")
    first.train()
    second = Trainer(PIPE, TrainConfig(steps=1, batch_size=2, seed=5), MovingBars(), tmp_path / "b")
    second.init_from(tmp_path / "a" / "model")
    for name, value in first.ema.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value) and torch.equal(second.ema.state_dict()[name], value)
    other = PipelineConfig(model=ModelConfig(input_size=(8, 8, 8), in_channels=3, hidden_size=32, depth=1,
                                             num_heads=2), codec="pixel")  # fmt: skip
    with pytest.raises(ValueError, match="different model"):
        Trainer(other, TrainConfig(steps=1), MovingBars(), tmp_path / "c").init_from(tmp_path / "a" / "model")


def test_compile_wraps_only_the_training_forward(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(module, **options):
        compiled.append((module, options))
        return module.forward  # a different callable standing in for the compiled module

    monkeypatch.setattr(torch, "compile", fake_compile)
    trainer = Trainer(PIPE, TrainConfig(steps=2, batch_size=2, compile=True, ckpt_every=2), MovingBars(), tmp_path)
    assert compiled == [(trainer.model, {"dynamic": False})] and trainer.forward is not trainer.model
    trainer.train()
    state = torch.load(tmp_path / "trainer.pt", weights_only=False)
    assert set(state["model"]) == set(trainer.ema.state_dict())  # plain module names, loadable by resume


def test_ema_follows_the_warmed_up_decay(tmp_path):
    trainer = Trainer(PIPE, TrainConfig(steps=1, batch_size=2, ckpt_every=10), MovingBars(), tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after, ema = trainer.model.state_dict(), trainer.ema.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed
    for k in changed:  # decay at step 0 is 1/10: the EMA moves 90% of the way
        assert torch.allclose(ema[k], before[k] + 0.9 * (after[k] - before[k]), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation only exists with a GPU")
def test_an_optimisation_step_never_waits_for_the_gpu(tmp_path):
    """A sync per step stops the CPU from queueing the next kernels while the GPU works (bound check, scalar
    copies to the device, ...): CUDA's sync debug mode turns each into an error."""
    trainer = Trainer(PIPE, TrainConfig(steps=1, batch_size=2), MovingBars(), tmp_path, device="cuda")
    clips = to_model_range(next(iter(trainer.loader)).to("cuda"))
    trainer.optimise(clips, 1)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for prefix in prefix_lengths(PIPE):
            trainer.optimise(clips, prefix)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_train_calls_continue_one_stream_of_batches(tmp_path):
    # a second train() (the profiler's timed chunks, a resumed budget) keeps the loader's iterator and its prefetch
    trainer = Trainer(PIPE, TrainConfig(steps=1, batch_size=2, ckpt_every=10), MovingBars(), tmp_path)
    starts = []
    loader = trainer.loader

    class Counting:
        def __iter__(self):
            starts.append(1)
            return iter(loader)

    trainer.loader = Counting()
    trainer.train()
    trainer.cfg = replace(trainer.cfg, steps=3)
    trainer.train()
    assert trainer.step == 3 and len(starts) == 1
