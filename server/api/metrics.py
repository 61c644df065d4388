"""Prometheus metrics (DESIGN.md names), read from the engine at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ca2vdm.server.engine.engine import Engine
from ca2vdm.server.engine.stats import Histogram

from .jobs import JobStore


def histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, count in zip([*h.buckets, float("inf")], h.counts, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


class EngineCollector:
    def __init__(self, engine: Engine, jobs: JobStore | None = None) -> None:
        self.engine, self.jobs = engine, jobs

    def collect(self) -> Iterator[Metric]:
        e, stats = self.engine, self.engine.stats
        yield GaugeMetricFamily("ca2vdm_sessions_active", "Sessions holding cache pages", value=e.num_active)
        yield GaugeMetricFamily("ca2vdm_sessions_waiting", "Sessions waiting for admission", value=e.num_waiting)
        total = CounterMetricFamily("ca2vdm_sessions", "Finished sessions by outcome", labels=["outcome"])
        for outcome, n in stats.sessions_total.items():
            total.add_metric([outcome], n)
        yield total
        yield GaugeMetricFamily("ca2vdm_cache_pages_total", "Pages in the K/V pool", value=e.runner.num_pages)
        yield GaugeMetricFamily("ca2vdm_cache_pages_free", "Free pages in the K/V pool", value=e.runner.num_free_pages)
        yield CounterMetricFamily("ca2vdm_frames_generated", "Frames handed to clients", value=stats.frames_generated)
        yield histogram("ca2vdm_time_to_first_clip_seconds", "Submit to first clip", stats.time_to_first_clip_seconds)
        yield histogram("ca2vdm_clip_interval_seconds", "Time between clips of a session", stats.clip_interval_seconds)
        yield histogram("ca2vdm_batch_size", "Sessions per denoising forward", stats.batch_size)
        yield histogram("ca2vdm_denoise_step_seconds", "One batched denoising step", stats.denoise_step_seconds)
        yield GaugeMetricFamily("ca2vdm_sessions_paused", "Sessions paused for their consumer", value=e.num_paused)
        yield CounterMetricFamily("ca2vdm_stalls", "Live clips out after their viewer needed them", value=stats.stalls)
        yield CounterMetricFamily("ca2vdm_stall_seconds", "Viewers' total wait for late live clips",
                                  value=stats.stall_seconds)  # fmt: skip
        yield histogram("ca2vdm_clip_lateness_seconds", "Live clip out minus due (negative: early)",
                         stats.clip_lateness_seconds)  # fmt: skip
        yield GaugeMetricFamily("ca2vdm_realtime_capacity_sessions",
                                "Live sessions at the model's default steps the engine estimates it keeps in real time",
                                value=e.realtime_capacity())  # fmt: skip
        yield GaugeMetricFamily("ca2vdm_sessions_detached", "Sessions whose client left, holding cache pages",
                                value=e.num_detached)  # fmt: skip
        yield GaugeMetricFamily("ca2vdm_sessions_resumable", "Sessions kept in host memory for a rebuilt resume",
                                value=e.num_resumable)  # fmt: skip
        yield GaugeMetricFamily("ca2vdm_resumable_bytes", "Host memory held by unloaded sessions",
                                value=e.resumable_bytes)  # fmt: skip
        resumes = CounterMetricFamily("ca2vdm_resumes", "Sessions resumed, by kind", labels=["kind"])
        for kind, n in stats.resumes.items():
            resumes.add_metric([kind], n)
        yield resumes
        yield CounterMetricFamily("ca2vdm_resume_expired", "Detached sessions dropped without a resume",
                                  value=stats.resume_expired)  # fmt: skip
        yield histogram("ca2vdm_resume_seconds", "Resume message to the first clip sent", stats.resume_seconds)
        switches = CounterMetricFamily("ca2vdm_prompt_switches", "Prompt changes mid-stream, by mode (keep: "
                                       "the cached frames keep their K/V; recache: rewritten)",
                                       labels=["mode"])  # fmt: skip
        for mode, n in stats.prompt_switches.items():
            switches.add_metric([mode], n)
        yield switches
        if self.jobs is not None:
            jobs = GaugeMetricFamily("ca2vdm_jobs", "REST video jobs by status", labels=["status"])
            for status, n in self.jobs.count_by_status().items():
                jobs.add_metric([status], n)
            yield jobs


def metrics_text(engine: Engine, jobs: JobStore | None = None) -> bytes:
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, jobs))  # type: ignore[arg-type]
    return generate_latest(registry)
