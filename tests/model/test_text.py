"""The text encoder of text-conditioned models (server/model/text.py) and how the loader, settings and CLI wire it:
a tiny random T5 written in transformers' layout with an offline tokenizer stands in for T5 v1.1 XXL."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ca2vdm.server.model.checkpoint import save_model_dir
from ca2vdm.server.model.config import get_preset
from ca2vdm.server.model.loader import load_pipeline
from ca2vdm.server.model.stdit import CausalSTDiT
from ca2vdm.server.model.text import (
    MAX_PROMPT_CHARS,
    PromptFeatures,
    TextEncoder,
    build_tiny_t5,
    random_text_encoder,
    tiny_text_encoder,
)

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "A red circle moves left."  # 6 words and punctuation: a red circle moves left . </s> = 7 tokens


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture()
def encoder(t5_dir: Path) -> TextEncoder:
    return TextEncoder.from_dir(t5_dir, max_length=8, device="cpu")


def count_forwards(enc: TextEncoder) -> list[int]:
    """Patch the encoder's forward to count its calls (and the prompts in each)."""
    calls: list[int] = []
    forward = enc.model.forward

    def counted(*args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return forward(*args, **kwargs)

    enc.model.forward = counted
    return calls


def test_directory_round_trip_gives_the_raw_t5_output_and_mask(t5_dir, encoder):
    assert {p.name for p in t5_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert encoder.caption_channels == 32 and encoder.max_length == 8
    assert not encoder.model.training and encoder.dtype == torch.float32
    f = encoder.encode(PROMPT)
    assert isinstance(f, PromptFeatures)
    assert f.y.shape == (8, 32) and f.y.dtype == torch.float32 and f.y.device.type == "cpu"
    assert f.mask.dtype == torch.int64 and f.mask.tolist() == [1] * 7 + [0]
    assert f.num_tokens == 7
    ids = encoder.tokenizer(PROMPT, max_length=8, padding="max_length", truncation=True, return_tensors="pt")
    assert ids["input_ids"][0].tolist()[6:] == [1, 0]  # </s> (T5's id 1) after the words, then <pad> (0)
    assert 2 not in ids["input_ids"][0].tolist()  # every word is in the vocabulary: no <unk>
    with torch.no_grad():
        raw = encoder.model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state[0]
    assert torch.equal(f.y, raw)  # y is the encoder's last hidden state, padding position included
    assert f.y[7].abs().sum() > 0
    # the same tiny encoder built in memory (random:tiny-text) is the directory's
    same = tiny_text_encoder(32, 8).encode(PROMPT)
    torch.testing.assert_close(same.y, f.y)
    assert torch.equal(same.mask, f.mask)


def test_truncation_keeps_max_length_tokens_and_the_eos(encoder):
    head = "two blue squares bounce up and down"  # 7 words + </s>: exactly max_length tokens
    long_a = encoder.encode(head + " slowly across the screen")
    long_b = encoder.encode(head + " quickly")
    assert long_a.mask.tolist() == [1] * 8 and long_a.num_tokens == 8
    ids = encoder.tokenizer(head + " slowly", max_length=8, padding="max_length", truncation=True)["input_ids"]
    assert len(ids) == 8 and ids[-1] == 1  # cut to 7 words, the eos kept
    # both are cut to the head + </s>: the head's features, and not those of another 7-word prompt
    torch.testing.assert_close(long_a.y, long_b.y)
    torch.testing.assert_close(long_a.y, encoder.encode(head).y)
    assert not torch.allclose(long_a.y, encoder.encode("two blue squares bounce up and left").y)


def test_a_repeated_prompt_is_encoded_once(encoder):
    calls = count_forwards(encoder)
    first = encoder.encode(PROMPT)
    second = encoder.encode(PROMPT)
    assert calls == [1]
    assert torch.equal(first.y, second.y) and torch.equal(first.mask, second.mask)
    info = encoder.cache_info()
    assert (info.hits, info.misses, info.currsize, info.maxsize, info.encoder_calls) == (1, 1, 1, 1024, 1)
    other = encoder.encode("a green triangle falls down")
    assert calls == [1, 1]
    assert not torch.allclose(other.y, first.y)  # different prompts, different features
    assert other.mask.tolist() == [1] * 6 + [0, 0]


def test_the_cache_is_a_bounded_lru(t5_dir):
    enc = TextEncoder.from_dir(t5_dir, max_length=8, device="cpu", cache_size=2)
    calls = count_forwards(enc)
    enc.encode("a red ball")
    enc.encode("a blue ball")
    enc.encode("a red ball")  # hit: now the most recently used
    enc.encode("a pink ball")  # evicts the blue ball (least recently used), not the red one
    assert enc.cache_info().currsize == 2 and len(calls) == 3
    enc.encode("a red ball")
    assert len(calls) == 3
    enc.encode("a blue ball")
    assert len(calls) == 4 and enc.cache_info().currsize == 2


def test_encode_many_batches_the_misses_in_one_call(t5_dir, encoder):
    calls = count_forwards(encoder)
    encoder.encode("a red ball")
    prompts = ["a red ball", "a star spins", "three dots fly up", "a star spins"]
    batch = encoder.encode_many(prompts)
    assert calls == [1, 2]  # one call for the two prompts not yet cached
    single = TextEncoder.from_dir(t5_dir, max_length=8, device="cpu")
    for prompt, f in zip(prompts, batch, strict=True):
        alone = single.encode(prompt)
        torch.testing.assert_close(f.y, alone.y, rtol=1e-5, atol=1e-5)
        assert torch.equal(f.mask, alone.mask)
    assert batch[1] is batch[3]


def test_padding_does_not_change_the_prompts_features(t5_dir, encoder):
    wide = TextEncoder.from_dir(t5_dir, max_length=16, device="cpu")
    short, long = encoder.encode(PROMPT), wide.encode(PROMPT)
    assert long.y.shape == (16, 32) and long.mask.tolist() == [1] * 7 + [0] * 9
    torch.testing.assert_close(long.y[:7], short.y[:7], rtol=1e-5, atol=1e-5)


def test_empty_and_overlong_prompts_are_refused_before_encoding(encoder):
    calls = count_forwards(encoder)
    for bad in ("", "  \n\t "):
        with pytest.raises(ValueError, match="empty"):
            encoder.encode(bad)
    with pytest.raises(ValueError, match=f"at most {MAX_PROMPT_CHARS}"):
        encoder.encode("a" * (MAX_PROMPT_CHARS + 1))
    with pytest.raises(ValueError, match="empty"):
        encoder.encode_many(["a red ball", " "])  # all checked before any is encoded
    assert calls == []
    assert encoder.encode("a " * (MAX_PROMPT_CHARS // 2)).num_tokens == 8  # the longest accepted prompt


def test_concurrent_encodes_agree_and_encode_each_prompt_once(encoder):
    calls = count_forwards(encoder)
    prompts = ["a red ball", "a blue box", "two stars"]
    results: list[list[PromptFeatures]] = []

    def work() -> None:
        results.append([encoder.encode(p) for p in prompts * 3])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and sum(calls) == len(prompts)
    for row in results:
        for f, g in zip(row, results[0], strict=True):
            assert torch.equal(f.y, g.y)


def test_an_official_style_directory_with_spiece_model_loads(tmp_path):
    """t5-v1_1-xxl ships spiece.model (SentencePiece), no tokenizer.json: the T5 tokenizer is built from it."""
    spm = pytest.importorskip("sentencepiece")
    d = build_tiny_t5(tmp_path / "t5", d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    model = io.BytesIO()
    sentences = ["a red circle moves left", "a blue square bounces up and down", "two green stars spin"] * 10
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False,
                                   minloglevel=2)  # fmt: skip
    (d / "spiece.model").write_bytes(model.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    enc = TextEncoder.from_dir(d, max_length=12, device="cpu")
    assert enc.caption_channels == 16
    f = enc.encode("a red circle")
    assert f.y.shape == (12, 16) and 2 <= f.num_tokens < 12 and f.mask[: f.num_tokens].all() and not f.mask[-1]
    ids = enc.tokenizer("a red circle")["input_ids"]
    assert ids[-1] == 1 and len(ids) == f.num_tokens


def test_from_dir_errors(tmp_path, t5_dir):
    with pytest.raises(FileNotFoundError, match="not a transformers T5 directory"):
        TextEncoder.from_dir(tmp_path / "missing", max_length=8)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="T5 encoder is expected"):
        TextEncoder.from_dir(tmp_path / "bert", max_length=8)
    with pytest.raises(ValueError, match="dtype"):
        TextEncoder.from_dir(t5_dir, max_length=8, device="cpu", dtype=torch.int8)


def test_random_xxl_shaped_encoder_small_on_cpu():
    kw = dict(layers=1, heads=2, d_kv=8, d_ff=32, vocab_size=256)
    enc = random_text_encoder(16, 6, device="cpu", dtype=torch.float32, seed=1, **kw)
    cfg = enc.model.config
    assert (cfg.num_layers, cfg.num_heads, cfg.d_ff, cfg.feed_forward_proj) == (1, 2, 32, "gated-gelu")
    assert enc.caption_channels == 16 and enc.max_length == 6
    f = enc.encode("a red ball bounces")
    assert f.y.shape == (6, 16) and torch.isfinite(f.y).all() and f.mask.tolist() == [1] * 5 + [0]
    again = random_text_encoder(16, 6, device="cpu", dtype=torch.float32, seed=1, **kw).encode("a red ball bounces")
    other = random_text_encoder(16, 6, device="cpu", dtype=torch.float32, seed=2, **kw).encode("a red ball bounces")
    assert torch.equal(f.y, again.y) and not torch.allclose(f.y, other.y)
    # its defaults are T5 v1.1 XXL's shape (checked on the config alone: the 4.8 B parameters are for GPUs)
    from ca2vdm.server.model.text import _t5_config

    xxl = _t5_config(4096, 64, 10240, 24, 64, 32128)
    assert (xxl.d_model, xxl.num_heads * xxl.d_kv, xxl.d_ff, xxl.num_layers) == (4096, 4096, 10240, 24)


def test_loader_gives_random_tiny_text_its_encoder():
    pipe = load_pipeline("random:tiny-text", device="cpu")
    assert pipe.text is not None and pipe.text.caption_channels == 32 and pipe.text.max_length == 8
    assert pipe.text.caption_channels == pipe.config.model.caption_channels
    assert pipe.text.encode(PROMPT).y.shape == (8, 32)
    assert load_pipeline("random:tiny", device="cpu").text is None
    assert pipe.text.cache_info().maxsize == 1024  # the default prompt cache
    assert load_pipeline("random:tiny-text", device="cpu", text_cache_size=3).text.cache_info().maxsize == 3


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = get_preset("tiny-text")
    path = tmp_path_factory.mktemp("text_model") / "m"
    save_model_dir(path, config, CausalSTDiT(config.model).randomize_(0))
    return path


def test_loader_text_encoder_from_a_directory(text_model_dir, t5_dir, tmp_path):
    with pytest.raises(ValueError, match=r"is text-conditioned: pass --text-encoder DIR \(a local T5 v1.1 XXL"):
        load_pipeline(str(text_model_dir), device="cpu")
    pipe = load_pipeline(str(text_model_dir), device="cpu", text_encoder=str(t5_dir), text_cache_size=0)
    assert pipe.text.name == str(t5_dir) and pipe.text.max_length == 8 and pipe.text.device.type == "cpu"
    assert pipe.text.cache_info().maxsize == 0
    narrow = build_tiny_t5(tmp_path / "t5_16", d_model=16)
    with pytest.raises(ValueError, match="hidden size 16.*32-channel captions"):
        load_pipeline(str(text_model_dir), device="cpu", text_encoder=str(narrow))
    # an official checkpoint of a text preset: refused before the checkpoint is read (this one is not one)
    ckpt = tmp_path / "t2v.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is text-conditioned: pass --text-encoder"):
        load_pipeline(str(ckpt), preset="tiny-text", device="cpu")
    with pytest.raises(ValueError, match="hidden size 16"):  # read from its config.json, before any weights
        load_pipeline(str(ckpt), preset="tiny-text", device="cpu", text_encoder=str(narrow))


def test_loader_refuses_a_text_encoder_for_a_model_without_text(t5_dir):
    with pytest.raises(ValueError, match="takes no text prompt"):
        load_pipeline("random:tiny", device="cpu", text_encoder=str(t5_dir))


def test_settings_and_cli_pass_the_text_encoder_on(t5_dir, tmp_path, monkeypatch, capsys):
    from ca2vdm.server.api.settings import Settings
    from ca2vdm.server.cli import build_parser, main

    monkeypatch.setenv("CA2VDM_TEXT_ENCODER", str(t5_dir))
    settings = Settings(_env_file=None)
    assert settings.text_encoder == str(t5_dir) and settings.text_encoder_device == "auto"
    args = build_parser().parse_args(["serve", "--text-encoder", "/t5", "--text-encoder-device", "cpu"])
    assert (args.text_encoder, args.text_encoder_device) == ("/t5", "cpu")
    assert build_parser().parse_args(["generate", "--frames", "1", "--out", "x.mp4"]).text_encoder == str(t5_dir)
    # generate loads through the same flags: a text encoder for a model without text is a one-line error
    rc = main(["generate", "--model", "random:tiny", "--frames", "1", "--out", str(tmp_path / "o.mp4")])
    assert rc == 2 and "takes no text prompt" in capsys.readouterr().err


def test_importing_the_server_does_not_import_transformers():
    code = (
        "import sys, ca2vdm.server.model.text, ca2vdm.server.model.loader, ca2vdm.server.cli\n"
        "assert 'transformers' not in sys.modules and 'tokenizers' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
