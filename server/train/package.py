"""Package a trained model directory as a servable model with its model card (`ca2vdm package`).

The card records what a reader needs to trust or reproduce the weights: the architecture, the data, the exact
training command(s), steps, wall time and card, the final losses, and the evaluation of the model beside the
ground truth and random weights, AR step by AR step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ca2vdm.server.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_model_dir
from ca2vdm.server.model.config import PipelineConfig
from ca2vdm.server.model.stdit import CausalSTDiT

MAX_WEIGHT_BYTES = 20_000_000  # the package's budget for the default model
CARD_FILE = "MODEL_CARD.md"
SHEET_FILE = "samples.png"


def _param_count(config: PipelineConfig) -> int:
    """Trainable parameters (the weights file also holds buffers: position tables, the <BOV> frame)."""
    with torch.device("meta"):
        return sum(p.numel() for p in CausalSTDiT(config.model).parameters())


def _eval_table(trained: dict, random: dict | None, chunk: int) -> list[str]:
    head = "| AR step | frames | trained | ground truth |" + (" random weights |" if random else "")
    rows = [head, "|" + "---|" * (4 + bool(random))]
    for i, (m, t) in enumerate(zip(trained["score_per_step"], trained["truth_score_per_step"], strict=True)):
        cells = [str(i + 1), f"{1 + i * chunk}–{(i + 1) * chunk}", f"{m:.3f}", f"{t:.3f}"]
        if random:
            cells.append(f"{random['score_per_step'][i]:.3f}")
        rows.append("| " + " | ".join(cells) + " |")
    mean = ["**mean**", "", f"**{trained['score']:.3f}**", f"{trained['truth_score']:.3f}"]
    if random:
        mean.append(f"{random['score']:.3f}")
    rows.append("| " + " | ".join(mean) + " |")
    return rows


def _long_eval_table(long: dict, per: int = 10) -> list[str]:
    """Mean score of every `per` AR steps of a long evaluation (e.g. 120 AR steps, 2 minutes at 8 fps)."""
    s, chunk = long["score_per_step"], long.get("chunk_frames", 8)
    rows = ["| AR steps | seconds at 8 fps | score | blank or frozen windows |", "|---|---|---|---|"]
    dead = long.get("collapsed_per_step")
    for i in range(0, len(s), per):
        j = min(i + per, len(s))
        cells = [f"{i + 1}–{j}", f"{i * chunk / 8:.0f}–{j * chunk / 8:.0f}", f"{sum(s[i:j]) / (j - i):.3f}",
                 f"{sum(dead[i:j]) / (j - i):.2f}" if dead else "—"]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def model_card(model_dir: Path, *, runs: list[dict], data: str, card: str, trained: dict, random: dict | None = None,
               sheet: str | None = None, limitations: str | None = None, long: dict | None = None) -> str:  # fmt: skip
    """Markdown model card. `runs`: [{"command", "steps", "minutes", "history": [...]}] in training order;
    `limitations`: what the weights cannot do yet, in the packager's words; `long`: a longer `ca2vdm eval`
    (e.g. --ar-steps 120), summarised per 10 AR steps."""
    config, _ = read_model_dir(model_dir)  # validates the directory too
    mc = config.model
    steps = sum(r["steps"] for r in runs)
    minutes = sum(r["minutes"] for r in runs)
    last = runs[-1]["history"][-1] if runs[-1].get("history") else {}
    size = (model_dir / WEIGHTS_FILE).stat().st_size
    lines = [
        "# ca2vdm default model",
        "",
        f"A Ca2-VDM (CausalSTDiT2) trained from scratch by `ca2vdm train` on {data}.",
        "",
        "## Model",
        f"- {mc.input_size[1]}×{mc.input_size[2]} RGB, {config.codec} space; patch {'×'.join(map(str, mc.patch_size))},"
        f" hidden {mc.hidden_size}, depth {mc.depth}, {mc.num_heads} heads, prefix attention over {mc.prefix_frames}"
        f" frames, temporal positions {mc.max_tpe_len} (cyclic)",
        f"- {_param_count(config) / 1e6:.2f} M parameters, {size / 1e6:.1f} MB ({WEIGHTS_FILE}, EMA weights)",
        f"- generation: {config.chunk_frames}-frame chunks, {config.max_cache_frames}-frame cache queue,"
        f" {config.fps} fps, cached frames perturbed to t_p = {config.prefix_perturb_t},"
        f" default sampler {config.default_sampler} with {config.default_steps} steps"
        + (
            "; also recommended: " + ", ".join(f"{s} with {n} steps" for s, n in config.schedules)
            if config.schedules
            else ""
        ),  # fmt: skip
        "",
        "## Training",
        f"- card: {card}; {steps:,} steps in {minutes:.1f} min"
        + (f"; last logged batch: epsilon-MSE {last['mse']:.4f}, L_vlb {last['vb']:.4f}" if last else ""),
        "- commands, in order (each later run continues the previous one: from its EMA weights, or with `--resume`"
        " or `continue` from its whole training state):",
        "",
    ]
    for r in runs:
        lines.append(f"  - `{r['command']}` — {r['steps']:,} steps, {r['minutes']:.1f} min")
    lines += [
        "",
        *(["## Limitations", limitations, ""] if limitations else []),
        "## Evaluation",
        f"`ca2vdm eval`: {len(trained['seeds'])} ground-truth videos (seeds {trained['seeds'][0]}…); the model"
        f" continues each from its first frame for {trained['ar_steps']} AR steps with {trained['sampler']}"
        f" {trained['steps']}; every 8-frame window is tracked and scored against the ground truth (object count,"
        " speeds, jumps, collapse; 1.0 = as plausible as the truth).",
        "",
        *_eval_table(trained, random, config.chunk_frames),
        "",
    ]
    if sheet:
        lines += [f"![truth above generated, every 12th frame]({sheet})", ""]
    if trained.get("parts"):
        lines.append("Score parts (trained, mean over windows): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in trained["parts"].items()))  # fmt: skip
        lines.append("")
    if long:
        lines += [f"### {long['ar_steps']} AR steps ({long['ar_steps'] * config.chunk_frames / config.fps:.0f} s)",
                  "", f"The same evaluation over {long['ar_steps']} AR steps ({len(long['seeds'])} videos,"
                  f" {long['sampler']} {long['steps']}): mean {long['score']:.3f}.", "",
                  *_long_eval_table({**long, "chunk_frames": config.chunk_frames}), ""]  # fmt: skip
    return "\n".join(lines)


def package(model_dir: str | Path, out_dir: str | Path, *, runs: list[dict], data: str, card: str, trained: dict,
            random: dict | None = None, sheet: str | Path | None = None, limitations: str | None = None,
            long: dict | None = None, max_bytes: int = MAX_WEIGHT_BYTES) -> Path:  # fmt: skip
    """Copy config + weights (+ the eval's contact sheet) to `out_dir` and write the card; refuses weights over
    `max_bytes`."""
    src, out = Path(model_dir), Path(out_dir)
    size = (src / WEIGHTS_FILE).stat().st_size
    if size > max_bytes:
        raise ValueError(f"{src / WEIGHTS_FILE} is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB budget")
    text = model_card(src, runs=runs, data=data, card=card, trained=trained, random=random,
                      sheet=SHEET_FILE if sheet else None, limitations=limitations, long=long)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(src / name, out / name)
    if sheet:
        shutil.copyfile(sheet, out / SHEET_FILE)
    (out / CARD_FILE).write_text(text)
    return out


def package_from_files(model_dir: str, out_dir: str, runs_file: str, eval_file: str, random_eval_file: str | None,
                       data: str, card: str, sheet: str | None = None, limitations: str | None = None,
                       long_eval_file: str | None = None) -> Path:  # fmt: skip
    """The CLI's entry: `runs_file` is a JSON list of runs ({command, steps, minutes, history_file?})."""
    runs = json.loads(Path(runs_file).read_text())
    for r in runs:
        if "history_file" in r:
            r["history"] = json.loads(Path(r.pop("history_file")).read_text())
    trained = json.loads(Path(eval_file).read_text())
    random = json.loads(Path(random_eval_file).read_text()) if random_eval_file else None
    return package(
        model_dir,
        out_dir,
        runs=runs,
        data=data,
        card=card,
        trained=trained,
        random=random,
        sheet=sheet,
        limitations=limitations,
        long=json.loads(Path(long_eval_file).read_text()) if long_eval_file else None,
    )
