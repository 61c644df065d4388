"""The README's benchmark table, generated from bench/results/*.json (run: python bench/report.py [--write])."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"


def _load(name: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / name).read_text())


def table() -> str:
    paged = _load("paged_cache_h100.json")
    model = _load("model_step_h100.json")
    eng = _load("engine_h200.json")
    bf, f8 = eng["runs"]["bf16"], eng["runs"]["fp8"]
    src = "engine_h200.json"
    rows = [("figure", "measured", "card", "source")]
    rows.append(
        (
            "denoising forward, 1 session, 25 cached frames (CUDA graph), bf16 / fp8",
            f"{bf['forward']['denoise_graph_ms']:.2f} / {f8['forward']['denoise_graph_ms']:.2f} ms "
            f"(floor {bf['forward']['floor_ms']:.2f} ms)",
            eng["card"],
            src,
        )
    )
    rows.append(
        (
            "80 frames × 100 IDDPM steps, 1 session, bf16 / fp8",
            f"{bf['table5']['seconds']:.1f} / {f8['table5']['seconds']:.1f} s",
            eng["card"],
            src,
        )
    )
    for a, b in zip(bf["sessions"], f8["sessions"], strict=True):
        rows.append(
            (
                f"{a['sessions']} sessions, 25 DDIM steps, bf16 / fp8: frames/s in all (first clip p50; of floor)",
                f"{a['aggregate_frames_per_s']:.1f} / {b['aggregate_frames_per_s']:.1f} "
                f"({a['time_to_first_generated_clip_p50_s']:.2f} / {b['time_to_first_generated_clip_p50_s']:.2f} s; "
                f"{100 * a['fraction_of_compute_floor']:.0f}% / {100 * b['fraction_of_compute_floor']:.0f}%)",
                eng["card"],
                src,
            )
        )
    for row in paged["temporal_attention"]:
        rows.append(
            (
                f"paged temporal attention, {row['sessions']} sessions (vs contiguous SDPA)",
                f"{row['paged_triton_ms']:.3f} ms ({row['ours_over_contiguous_sdpa']:.2f}×, "
                f"{100 * row['fraction_of_copy_bandwidth']:.0f}% of copy bandwidth)",
                paged["card"],
                "paged_cache_h100.json",
            )
        )
    cap = paged["capacity"]
    rows.append(
        (
            "25-frame XL/2 sessions that fit next to the model",
            f"{cap['sessions_25_frames']}",
            paged["card"],
            "paged_cache_h100.json",
        )
    )
    rows.append(
        (
            "recompute forward, 25 + 8 frames (the no-cache baseline)",
            f"{model['ar_steps'][-1]['recompute_ms']:.1f} ms",
            model["card"],
            "model_step_h100.json",
        )
    )
    streams = {
        "stream_default_cpu.json": (("one_session_with_image", "1 session"), ("four_sessions", "4 sessions")),
        "stream_default_gpu.json": (("one_session_with_image", "1 session"), ("sixteen_sessions", "16 sessions")),
    }
    for name, keys in streams.items():
        stream = _load(name)
        for key, label in keys:
            row = stream[key]
            rows.append(
                (
                    f"default model streamed over the websocket, {label}: frames/s each (first clip p50)",
                    f"{row['frames_per_s_per_session_p50']:.1f} ({row['first_clip_s_p50']:.2f} s)",
                    stream["card"].split(",")[0].split(" (")[0],
                    name,
                )
            )
    rt = _load("realtime_h200.json")
    b, f = rt["summary"]["bf16"], rt["summary"]["fp8"]
    rows.append(
        (
            "live viewers held at 8 fps with zero stalls, XL/2 25 DDIM steps, bf16 / fp8 (joining first clip p50)",
            f"{b['sessions_held']} / {f['sessions_held']} ({b['joining_first_clip_p50_s']:.2f} / "
            f"{f['joining_first_clip_p50_s']:.2f} s; {100 * b['fraction_of_compute_floor']:.0f}% of floor)",
            rt["card"],
            "realtime_h200.json",
        )
    )
    steps = _load("realtime_steps_h200.json")
    s25, s4 = steps["steps_25"], steps["steps_4"]
    rows.append(
        (
            "live XL/2 viewers held at 8 fps, bf16, DDIM 25 / 4 steps (joining first clip p50; share of floor)",
            f"{s25['sessions_held']} / {s4['sessions_held']} ({steps['ratio_sessions_4_over_25']:.2f}×; "
            f"{s25['joining_first_clip_p50_s']:.2f} / {s4['joining_first_clip_p50_s']:.2f} s; "
            f"{100 * s25['fraction_of_compute_floor']:.0f}% / {100 * s4['fraction_of_compute_floor']:.0f}%)",
            steps["card"],
            "realtime_steps_h200.json",
        )
    )
    text = _load("text_cost_h200.json")
    step8, enc = text["denoise_step"]["8"], text["text_encoder"]
    switch = text["switch_latency"]
    rows.append(
        (
            "XL/2-text + a T5-XXL-sized encoder: prompt encode (new / cached); 8 sessions' denoising step unguided / "
            "guided; prompt switch to the first new clip, keep / recache (its write)",
            f"{enc['encode_miss_ms_p50']:.0f} ms / {1e3 * enc['encode_hit_ms']:.0f} µs; "
            f"{step8['prompt_ms']:.1f} / {step8['guided_7_ms']:.1f} ms ({step8['guided_over_prompt']:.2f}×); "
            f"{switch['keep']['to_first_new_clip_s_p50']:.2f} / {switch['recache']['to_first_new_clip_s_p50']:.2f} s "
            f"({text['switch_runner']['guided_7']['recache_ms']:.0f} ms)",
            text["card"],
            "text_cost_h200.json",
        )
    )
    cpu = _load("realtime_cpu.json")["summary"]
    rows.append(
        (
            "live viewers of the default model held 60 s at 8 fps with zero stalls (joining first clip p50 / p99)",
            f"{cpu['sessions_held_zero_stalls']} ({cpu['joining_first_clip_p50_s']:.2f} / "
            f"{cpu['joining_first_clip_p99_s']:.2f} s)",
            "cpu, 2 cores",
            "realtime_cpu.json",
        )
    )
    hostile = _load("hostile_load_cpu.json")
    u, lo = hostile["unloaded"]["realtime"], hostile["loaded"]["realtime"]
    rows.append(
        (
            "a live viewer under a mixed hostile load: first clip, frames/s (unloaded -> loaded); /healthz p99",
            f"{u['first_clip_s']:.2f} -> {lo['first_clip_s']:.2f} s, {u['frames_per_s']:.1f} -> "
            f"{lo['frames_per_s']:.1f}; {hostile['loaded']['healthz_ms_p99']:.0f} ms",
            "cpu, 2 cores",
            "hostile_load_cpu.json",
        )
    )
    resume = _load("resume_cpu.json")
    lat = {row["kind"]: row for row in resume["latency"]}
    after = [r for r in resume["closeness"]["rows"] if r["dequeued_before_drop"]]
    rows.append(
        (
            "resume after a dropped connection, default model: resume to first clip, exact / rebuilt (p50); "
            "rebuilt next clip after the queue dequeued",
            f"{lat['exact']['median_s']:.3f} / {lat['rebuilt']['median_s']:.3f} s; exact path equal: "
            f"{'yes' if resume['exact_resume_equal'] else 'NO'}; "
            f"{min(r['psnr_next_clip_db'] for r in after):.1f}-{max(r['psnr_next_clip_db'] for r in after):.1f} dB",
            "cpu, 2 cores",
            "resume_cpu.json",
        )
    )
    two = _load("scaleout_h200x2.json")
    held = [two["single_server"], two["ray"]["1"], two["ray"]["2"]]
    rows.append(
        (
            "live XL/2 viewers held at 8 fps, 25 DDIM steps, bf16: single server / Ray Serve, 1 replica / 2 replicas "
            "on 2 GPUs (joining first clip p50 / p99)",
            " / ".join(str(h["sessions_held"]) for h in held)
            + " ("
            + " / ".join(f"{h['joining_first_clip_p50_s']:.2f}-{h['joining_first_clip_p99_s']:.2f}" for h in held)
            + " s)",
            "2× NVIDIA H200",
            "scaleout_h200x2.json",
        )
    )
    kill = two["ray"]["2"]["kill"]
    victims = kill["victims"]
    rows.append(
        (
            f"one of 2 replicas killed (SIGKILL) at {kill['sessions']} live XL/2 viewers: the other replica's stalls; "
            "victims told (`expired` on resume); replacement replica up; victims streaming again; stalls of the "
            f"whole load {kill['held_again']['seconds']:.0f} s after",
            f"{kill['other_replica_stalls_until_recovered']}; "
            f"{max(v['resume_answered_after_kill_s'] for v in victims):.2f} s; {kill['replica_back_after_s']:.0f} s; "
            f"{kill['victims_streaming_again_after_s']:.0f} s; {kill['held_again']['stalls']}",
            "2× NVIDIA H200",
            "scaleout_h200x2.json",
        )
    )
    for name, card, shape in (
        ("scaleout_cpu16_h200host.json", "16 CPU cores", "default model's shape, 4 threads each"),
        ("scaleout_cpu.json", "cpu, 2 cores", "default model, 4 steps, 1 thread each"),
    ):
        run = _load(name)
        counts = [run["single_server"]] + [run["ray"][k] for k in sorted(run["ray"], key=int)]
        rows.append(
            (
                f"live viewers held at 8 fps, {shape}: single server / Ray Serve with "
                + " / ".join(sorted(run["ray"], key=int))
                + " replicas",
                " / ".join(str(c["sessions_held"]) for c in counts),
                card,
                name,
            )
        )
    for name, card in (("scaleout_h200x2.json", "2× NVIDIA H200 host"), ("scaleout_cpu.json", "cpu, 2 cores")):
        added = _load(name)["overhead"]["added_ms_p50"]
        rows.append(
            (
                "the Ray Serve hop, p50 added to the single server's: REST call / stream start to ready / clip gap",
                f"{added['rest_get_models']:+.1f} / {added['stream_start_to_ready']:+.1f} / "
                f"{added['clip_interval_max_pace']:+.1f} ms",
                card,
                name,
            )
        )
    ctx = _load("train_small_context_h200.json")["packaged"]
    rows.append(
        (
            f"default model (`small`, {ctx['total_steps']:,} steps on sprites, the last {ctx['context_steps']:,} with"
            " self-generated context): tracking score over 30 AR steps / AR steps 21–30 / 120 AR steps"
            " (truth / random; before the self-generated context)",
            f"{ctx['score_30']:.3f} / {ctx['score_ar21_30']:.3f} / {ctx['score_120']:.3f} ({ctx['truth_30']:.3f} /"
            f" {ctx['random_30']:.3f}; {ctx['before_score_30']:.3f} / {ctx['before_score_ar21_30']:.3f} / —)",
            "NVIDIA H200 (120 AR steps and random: 2-core CPU)",
            "train_small_context_h200.json",
        )
    )
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def render(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    path = ROOT / "README.md"
    text = render(path.read_text())
    if "--write" in sys.argv:
        path.write_text(text)
    else:
        print(table())
