"""The generation loop and `ca2vdm generate`, end to end on CPU (pixel tiny model and a tiny SD-VAE)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from ca2vdm.server.cli import main
from ca2vdm.server.media import read_video
from ca2vdm.server.model.checkpoint import save_model_dir
from ca2vdm.server.model.config import ModelConfig, PipelineConfig
from ca2vdm.server.model.diffusion import make_sampler
from ca2vdm.server.model.generate import generate_clips, generate_video
from ca2vdm.server.model.loader import load_pipeline
from ca2vdm.server.model.stdit import CausalSTDiT
from tests.images import smooth_image


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("random:tiny", device="cpu")


def test_clips_follow_the_chunk_schedule(tiny):
    image = smooth_image(*tiny.frame_size)
    sampler = make_sampler("ddim", 3)
    clips = list(generate_clips(tiny, sampler, image=image, num_frames=20, seed=1))
    assert [c.shape[0] for c in clips] == [1, 8, 8, 3]
    assert torch.equal(clips[0][0], image)  # pixel codec: frame 0 is the image itself
    assert all(c.dtype == torch.uint8 and c.shape[1:] == (16, 16, 3) for c in clips)


def test_generation_is_deterministic_per_seed(tiny):
    image = smooth_image(*tiny.frame_size)
    sampler = make_sampler("iddpm", 4)
    a = generate_video(tiny, sampler, image=image, num_frames=9, seed=7)
    b = generate_video(tiny, sampler, image=image, num_frames=9, seed=7)
    c = generate_video(tiny, sampler, image=image, num_frames=9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a[1:], c[1:])


def test_generation_without_image_starts_from_bov(tiny):
    frames = generate_video(tiny, make_sampler("ddim", 2), image=None, num_frames=5, seed=0)
    assert frames.shape == (5, 16, 16, 3)
    with pytest.raises(ValueError, match="image must be"):
        list(generate_clips(tiny, make_sampler("ddim", 2), image=smooth_image(8, 8), num_frames=3, seed=0))


def test_sd_vae_pipeline(tmp_path, tiny_vae_dir):
    """A latent model directory with a `vae/` folder: image -> latents -> cache -> decoded frames."""
    import shutil

    config = PipelineConfig(
        model=ModelConfig(input_size=(8, 8, 8), hidden_size=32, depth=2, num_heads=2), codec="sd-vae"
    )
    save_model_dir(tmp_path / "m", config, CausalSTDiT(config.model).randomize_(0))
    shutil.copytree(tiny_vae_dir, tmp_path / "m" / "vae")
    pipe = load_pipeline(str(tmp_path / "m"), device="cpu")
    assert pipe.frame_size == (16, 16)
    frames = generate_video(pipe, make_sampler("ddim", 2), image=smooth_image(16, 16), num_frames=10, seed=0)
    assert frames.shape == (10, 16, 16, 3)
    shutil.rmtree(tmp_path / "m" / "vae")
    with pytest.raises(FileNotFoundError, match="SD-VAE"):
        load_pipeline(str(tmp_path / "m"), device="cpu")


def png_bytes(img: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img.numpy()).save(buf, format="PNG")
    return buf.getvalue()


def test_cli_generate_writes_playable_mp4(tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(png_bytes(smooth_image(40, 56)))  # resized and centre-cropped to 16x16
    out = tmp_path / "y.mp4"
    rc = main(
        [
            "generate",
            "--model",
            "random:tiny",
            "--image",
            str(image),
            "--frames",
            "17",
            "--steps",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    video = read_video(out)
    assert video.shape == (17, 16, 16, 3)


def test_cli_generate_reads_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CA2VDM_MODEL", "random:tiny")
    monkeypatch.setenv("CA2VDM_FRAMES", "3")
    monkeypatch.setenv("CA2VDM_STEPS", "2")
    out = tmp_path / "z.mp4"
    assert main(["generate", "--out", str(out)]) == 0
    assert read_video(out).shape[0] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{tmp}/missing.png"], "image not found"),
        (["--image", "{tmp}/corrupt.png"], "cannot decode image"),
        (["--model", "{tmp}/missing.pt", "--preset", "tiny"], "not found"),
        (["--model", "{tmp}/corrupt.pt", "--preset", "tiny"], "cannot read checkpoint"),
        (["--frames", "0"], "--frames"),
    ],
)
def test_cli_generate_errors(tmp_path, capsys, args, message):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    base = {"--model": "random:tiny", "--frames": "3", "--out": str(tmp_path / "o.mp4")}
    argv = [a.format(tmp=tmp_path) for a in args]
    for flag, value in base.items():
        if flag not in argv:
            argv += [flag, value]
    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()
