"""Text encoder of text-conditioned models: T5 v1.1 XXL features, as the official Ca2-VDM / Open-Sora encode prompts.

A prompt is tokenized to exactly `max_length` tokens (the model's `model_max_length`: padded with <pad> on the right,
truncated, `</s>` appended), run through the T5 encoder with that attention mask, and the encoder's last hidden state
is the caption: `y` (L, C) — padding positions included, raw — and `mask` (L,) with 1 on the real tokens (`</s>` among
them) and 0 on padding. The model embeds `y` (its `y_embedder`) and cross-attends to the tokens the mask keeps.

`TextEncoder.from_dir` loads a local transformers directory (`config.json`, weights, tokenizer files); nothing is
downloaded. Encoded prompts are kept in a bounded LRU cache keyed by the prompt text, so a prompt that many sessions
share is encoded once. `transformers` (the `text` extra) is imported only when an encoder is built.

For tests and benchmarks without T5 weights: `build_tiny_t5` writes a tiny random T5 directory with an offline
word-level tokenizer, `tiny_text_encoder` builds the same in memory (`random:tiny-text`), and `random_text_encoder`
builds a random T5-v1.1-XXL-shaped encoder directly on a device (`random:XL/2-text`: the cost of encoding, not its
meaning).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from .devices import resolve_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, T5Config, T5EncoderModel

__all__ = [
    "MAX_PROMPT_CHARS",
    "DEFAULT_CACHE_SIZE",
    "PromptFeatures",
    "CacheInfo",
    "TextEncoder",
    "build_tiny_t5",
    "tiny_text_encoder",
    "random_text_encoder",
    "TINY_VOCAB",
    "check_prompt",
    "encode_prompts",
]

#: Longest prompt accepted, in characters (T5 keeps at most `max_length` tokens of it anyway).
MAX_PROMPT_CHARS = 2000
#: Prompts whose features a TextEncoder keeps (T5 XXL at 120 tokens: ~2 MiB of host memory each).
DEFAULT_CACHE_SIZE = 1024
#: Prompts per encoder forward in `encode_many`.
MAX_BATCH = 32

_INSTALL_HINT = "text-conditioned models need transformers and tokenizers: pip install 'ca2vdm[text]'"
_ARCHITECTURES = ("t5", "mt5")  # what T5EncoderModel loads faithfully


@dataclass(frozen=True, eq=False)
class PromptFeatures:
    """One encoded prompt, on the CPU. Shared with the encoder's cache: treat the tensors as read-only."""

    y: Tensor  # (L, C) float32: the T5 encoder's last hidden state, padding positions included
    mask: Tensor  # (L,) int64: 1 on the prompt's tokens (incl. the </s> eos), 0 on padding
    num_tokens: int  # mask.sum(): tokens the prompt kept after truncation, eos included


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int
    encoder_calls: int  # forwards of the encoder (a batch of misses is one)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return transformers


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 4.56 renamed `torch_dtype` to `dtype` (the old name warns)."""
    major, minor = (int(part) for part in _transformers().__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _resolve_device(device: str | torch.device) -> torch.device:
    return resolve_device(device, "the text encoder was asked for a CUDA device")


def _resolve_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """bf16 on CUDA (T5 v1.1 overflows fp16 in places; fp16 is allowed when asked for), fp32 on the CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"text encoder dtype must be bfloat16, float16 or float32, not {dtype}")
    return dtype


def check_prompt(prompt: object) -> str:
    """The prompt if it is encodable, else ValueError saying why."""
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a string, not {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("the prompt is empty: a text-conditioned model needs some text")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted")
    return prompt


class TextEncoder:
    """A T5 encoder and its tokenizer, with a thread-safe LRU cache of encoded prompts.

    `encode(prompt)` returns the prompt's `PromptFeatures`; a cached prompt costs a dictionary lookup. Encoding runs
    one forward at a time (a lock), under `torch.no_grad` with the encoder in eval mode.
    """

    def __init__(
        self,
        model: T5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        name: str = "t5",
    ) -> None:
        if max_length < 1:
            raise ValueError("max_length must be >= 1")
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(f"text encoder {name}: its tokenizer defines no pad or eos token (not a T5 tokenizer?)")
        tokenizer.padding_side = "right"  # T5's: the real tokens first, as the official encoder feeds them
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self._max_length = int(max_length)
        self._cache_size = int(cache_size)
        self._cache: OrderedDict[str, PromptFeatures] = OrderedDict()
        self._cache_lock = threading.Lock()  # the cache and the counters
        self._encode_lock = threading.Lock()  # one forward at a time (fast tokenizers are not reentrant either)
        self._hits = 0
        self._misses = 0
        self._encoder_calls = 0

    # ---- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        max_length: int,
        device: str | torch.device = "auto",
        dtype: torch.dtype | None = None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> TextEncoder:
        """Load a local transformers T5 directory (e.g. t5-v1_1-xxl: `config.json`, the weights — a full T5's
        decoder is skipped — and the tokenizer: `tokenizer.json` or `spiece.model`). Nothing is downloaded.
        bf16 on CUDA unless `dtype` says otherwise, fp32 on the CPU."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"text encoder not found: {path} is not a transformers T5 directory (config.json, the weights and "
                "the tokenizer files)"
            )
        transformers = _transformers()
        dev = _resolve_device(device)
        dtype = _resolve_dtype(dev, dtype)
        try:
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the text encoder's config.json in {path}: {exc}") from exc
        if config.model_type not in _ARCHITECTURES:
            raise ValueError(f"text encoder {path}: a T5 encoder is expected, config.json says {config.model_type!r}")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, ImportError) as exc:
            raise ValueError(
                f"cannot load the tokenizer in {path} (tokenizer.json, or spiece.model with sentencepiece and "
                f"protobuf installed): {exc}"
            ) from exc
        try:
            model = transformers.T5EncoderModel.from_pretrained(path, local_files_only=True, **_dtype_kwargs(dtype))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the T5 encoder weights in {path}: {exc}") from exc
        return cls(model.to(dev), tokenizer, max_length, cache_size=cache_size, name=str(path))

    # ---- properties --------------------------------------------------------------------------------------

    @property
    def caption_channels(self) -> int:
        """C of `y`: the encoder's hidden size (4096 for T5 v1.1 XXL)."""
        return int(self.model.config.d_model)

    @property
    def max_length(self) -> int:
        """L: tokens per prompt, padding included."""
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ---- encoding ----------------------------------------------------------------------------------------

    def encode(self, prompt: str) -> PromptFeatures:
        """The features of one prompt (from the cache when it was encoded before). ValueError for an empty or
        whitespace-only prompt and one over MAX_PROMPT_CHARS characters."""
        return self.encode_many([prompt])[0]

    def encode_many(self, prompts: Sequence[str]) -> list[PromptFeatures]:
        """The features of each prompt, in order; the prompts not in the cache are encoded together (batches of
        MAX_BATCH). Every prompt is checked before anything is encoded."""
        prompts = [check_prompt(p) for p in prompts]
        found: dict[str, PromptFeatures] = {}
        with self._cache_lock:
            for p in prompts:
                if p in found:
                    continue
                hit = self._cache.get(p)
                if hit is not None:
                    self._cache.move_to_end(p)
                    self._hits += 1
                    found[p] = hit
        missing = list(dict.fromkeys(p for p in prompts if p not in found))
        if missing:
            with self._encode_lock:
                with self._cache_lock:  # another thread may have encoded some while this one waited
                    for p in list(missing):
                        hit = self._cache.get(p)
                        if hit is not None:
                            self._cache.move_to_end(p)
                            self._hits += 1
                            found[p] = hit
                            missing.remove(p)
                    self._misses += len(missing)
                for start in range(0, len(missing), MAX_BATCH):
                    batch = missing[start : start + MAX_BATCH]
                    features = self._forward(batch)
                    with self._cache_lock:
                        self._encoder_calls += 1
                        for p, f in zip(batch, features, strict=True):
                            found[p] = f
                            self._remember(p, f)
        return [found[p] for p in prompts]

    def _forward(self, prompts: list[str]) -> list[PromptFeatures]:
        tokens = self.tokenizer(
            prompts,
            max_length=self._max_length,
            padding="max_length",
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        dev = self.device
        ids = tokens["input_ids"].to(dev)
        mask = tokens["attention_mask"].to(dev)
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        y = hidden.float().cpu()
        mask = mask.to(device="cpu", dtype=torch.int64)
        return [PromptFeatures(y=y[i].clone(), mask=mask[i].clone(), num_tokens=int(mask[i].sum())) for i in
                range(len(prompts))]  # fmt: skip

    def _remember(self, prompt: str, features: PromptFeatures) -> None:
        if self._cache_size == 0:
            return
        self._cache[prompt] = features
        self._cache.move_to_end(prompt)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    # ---- the cache -----------------------------------------------------------------------------------------

    def cache_info(self) -> CacheInfo:
        with self._cache_lock:
            return CacheInfo(self._hits, self._misses, self._cache_size, len(self._cache), self._encoder_calls)

    def cache_clear(self) -> None:
        with self._cache_lock:
            self._cache.clear()


# ---- random encoders for tests and benchmarks ----------------------------------------------------------------

#: The offline tokenizer's vocabulary: T5's special tokens at T5's ids, then words for captions of simple moving
#: shapes (the sprites the packaged models are trained on). Anything else is <unk>.
TINY_VOCAB: tuple[str, ...] = (
    "<pad>", "</s>", "<unk>",
    ".", ",", "!", "?", "-", "'", ":", ";",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    "a", "an", "the", "and", "or", "of", "with", "in", "on", "at", "to", "from", "into", "onto", "over", "under",
    "behind", "past", "through", "toward", "towards", "away", "across", "around", "along", "between", "each",
    "other", "is", "are", "it", "its", "they", "their", "then", "while", "as", "by", "near", "far", "again",
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "many", "several", "some",
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "grey", "brown", "cyan",
    "magenta", "violet", "gold", "silver", "bright", "dark", "light", "pale", "colorful", "colourful",
    "circle", "circles", "square", "squares", "triangle", "triangles", "rectangle", "rectangles", "ball", "balls",
    "box", "boxes", "dot", "dots", "disc", "discs", "disk", "ring", "rings", "star", "stars", "cross", "diamond",
    "diamonds", "shape", "shapes", "sprite", "sprites", "blob", "blobs", "object", "objects", "line", "lines",
    "small", "large", "big", "tiny", "little", "huge", "round", "solid", "hollow",
    "moves", "move", "moving", "bounces", "bounce", "bouncing", "slides", "slide", "sliding", "rotates", "rotate",
    "rotating", "spins", "spin", "spinning", "falls", "fall", "falling", "rises", "rise", "rising", "drifts",
    "drift", "drifting", "flies", "fly", "flying", "jumps", "jump", "jumping", "rolls", "roll", "rolling", "grows",
    "grow", "growing", "shrinks", "shrink", "shrinking", "fades", "fade", "fading", "appears", "appear",
    "disappears", "disappear", "follows", "follow", "following", "chases", "chase", "chasing", "collide",
    "collides", "stops", "stop", "stays", "stay", "still", "turns", "turn", "passes", "pass", "wobbles", "orbits",
    "left", "right", "up", "down", "top", "bottom", "middle", "center", "centre", "corner", "corners", "edge",
    "edges", "side", "sides", "diagonally", "horizontally", "vertically", "slowly", "quickly", "fast", "slow",
    "steadily", "back", "forth", "screen", "frame", "scene", "background", "foreground", "sky", "floor", "wall",
    "video", "clip",
)  # fmt: skip


def _tiny_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerBase:
    """A word-level tokenizer over TINY_VOCAB built offline (no files, no network), with T5's special tokens and
    conventions: NFKC + lowercase, split on whitespace and punctuation (digits one by one), `</s>` appended."""
    transformers = _transformers()
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {word: i for i, word in enumerate(TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _t5_config(d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int, vocab_size: int) -> T5Config:
    """A T5 v1.1 encoder's configuration (gated-GELU feed-forward, untied embeddings)."""
    if min(d_model, d_kv, d_ff, num_layers, num_heads, vocab_size) < 1:
        raise ValueError("T5 sizes must all be >= 1")
    return _transformers().T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _randomize_t5_(model: T5EncoderModel, seed: int) -> T5EncoderModel:
    """Seeded random weights, in place, on the model's device and in its dtype, at the scales of T5's own
    initialisation (the 1/sqrt(d_kv) attention scale folded into the queries), so that a deep stack stays finite
    in bf16: token embeddings N(0, 1), queries N(0, 1/(d_model d_kv)), keys, values and the feed-forward input
    N(0, 1/d_model), attention outputs N(0, 1/(heads d_kv)), feed-forward outputs N(0, 1/d_ff), norms 1,
    relative position biases N(0, 1/d_model)."""
    cfg = model.config
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    inner = cfg.num_heads * cfg.d_kv
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.split(".")[-2] if "." in name else name
            if "layer_norm" in name:
                param.fill_(1.0)
                continue
            if name.startswith("shared") or name.endswith("embed_tokens.weight"):
                std = 1.0
            elif leaf == "q":
                std = (cfg.d_model * cfg.d_kv) ** -0.5
            elif leaf == "o":
                std = inner**-0.5
            elif leaf == "wo":
                std = cfg.d_ff**-0.5
            else:  # k, v, wi / wi_0 / wi_1, relative_attention_bias
                std = cfg.d_model**-0.5
            param.normal_(0.0, std, generator=gen)
    return model


def _random_t5(config: T5Config, device: torch.device, dtype: torch.dtype, seed: int) -> T5EncoderModel:
    """A T5EncoderModel allocated directly on `device` in `dtype` (no CPU copy), then seeded random weights."""
    transformers = _transformers()
    with torch.device(device):
        model = transformers.T5EncoderModel._from_config(config, **_dtype_kwargs(dtype))
    return _randomize_t5_(model.to(device=device, dtype=dtype), seed)


def _tiny_config(d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int) -> T5Config:
    vocab_size = -(-len(TINY_VOCAB) // 64) * 64  # round up, as real vocabularies are
    return _t5_config(d_model, d_kv, d_ff, num_layers, num_heads, vocab_size)


def build_tiny_t5(
    directory: str | Path,
    d_model: int = 32,
    *,
    d_kv: int = 8,
    d_ff: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a tiny random T5 encoder and its offline tokenizer to `directory`, in the layout of a real T5
    directory (`config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`), so that
    `TextEncoder.from_dir` loads it as it would t5-v1_1-xxl. Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = _tiny_config(d_model, d_kv, d_ff, num_layers, num_heads)
    model = _random_t5(config, torch.device("cpu"), torch.float32, seed)
    model.save_pretrained(directory)
    _tiny_tokenizer().save_pretrained(directory)
    return directory


def tiny_text_encoder(
    caption_channels: int,
    max_length: int,
    seed: int = 0,
    *,
    device: str | torch.device = "cpu",
    cache_size: int = DEFAULT_CACHE_SIZE,
) -> TextEncoder:
    """The tiny random T5 encoder of `build_tiny_t5` (d_model = caption_channels), in memory, in fp32."""
    config = _tiny_config(caption_channels, d_kv=8, d_ff=2 * caption_channels, num_layers=2, num_heads=4)
    model = _random_t5(config, _resolve_device(device), torch.float32, seed)
    return TextEncoder(model, _tiny_tokenizer(), max_length, cache_size=cache_size, name="random:tiny-t5")


def random_text_encoder(
    caption_channels: int,
    max_length: int,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    *,
    layers: int = 24,
    heads: int = 64,
    d_kv: int = 64,
    d_ff: int = 10240,
    vocab_size: int = 32128,
    cache_size: int = DEFAULT_CACHE_SIZE,
) -> TextEncoder:
    """A random encoder of T5 v1.1 XXL's shape (d_model = caption_channels = 4096, 64 heads of 64, d_ff 10240,
    24 layers, gated GELU) built directly on `device` in `dtype` (bf16 on CUDA by default): what encoding a prompt
    costs, not what it means. The tokenizer is the offline word-level one (its ids are all < vocab_size).
    At full size this is 4.8 B parameters: meant for GPUs."""
    dev = _resolve_device(device)
    dtype = _resolve_dtype(dev, dtype)
    if vocab_size < len(TINY_VOCAB):
        raise ValueError(f"vocab_size must be >= {len(TINY_VOCAB)} (the offline tokenizer's words)")
    config = _t5_config(caption_channels, d_kv, d_ff, layers, heads, vocab_size)
    model = _random_t5(config, dev, dtype, seed)
    return TextEncoder(model, _tiny_tokenizer(), max_length, cache_size=cache_size, name="random:t5-v1_1-xxl")


def encode_prompts(encoder: TextEncoder, prompts: Iterable[str]) -> tuple[Tensor, Tensor]:
    """Stack prompts' features as the model takes them: y (B, 1, L, C) and mask (B, L), on the CPU."""
    features = encoder.encode_many(list(prompts))
    return torch.stack([f.y for f in features])[:, None], torch.stack([f.mask for f in features])
