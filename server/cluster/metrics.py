"""/metrics of a cluster: every engine replica's metrics with a `replica` label, and the cluster's totals.

The ingress asks each replica it knows of (Serve's membership, as this process's router sees it) for its metrics
text, at scrape time and in parallel; a replica that does not answer within the timeout is left out of that scrape
(`ca2vdm_cluster_replicas_scraped` says how many answered). Every series of a replica gets `replica="<id>"`; each
family also appears summed over the replicas as `ca2vdm_cluster_<name>` (sessions, capacity, frames, stalls,
histograms bucket by bucket), so a dashboard needs no `sum without (replica)` for the totals. The ingress adds what
only it knows: the jobs by status (one shared store) and the resume latency its clients saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from ca2vdm.server.api.metrics import histogram

from .membership import members
from .remote import RemoteEngine

SCRAPE_TIMEOUT_S = 2.0
PREFIX, CLUSTER = "ca2vdm_", "ca2vdm_cluster_"


def merge(texts: dict[str, str]) -> list[Metric]:
    """Families of several replicas' exposition texts: each sample labelled with its replica, then the totals."""
    labelled: dict[str, Metric] = {}
    totals: dict[str, Metric] = {}
    sums: dict[str, dict[tuple, float]] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            out = labelled.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            total_name = CLUSTER + family.name.removeprefix(PREFIX)
            totals.setdefault(family.name, Metric(total_name, f"{family.documentation} (all replicas)", family.type))
            acc = sums.setdefault(family.name, {})
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                out.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value)
                key = (sample.name, tuple(sorted(sample.labels.items())))
                acc[key] = acc.get(key, 0.0) + sample.value
    for name, total in totals.items():
        for (sample_name, labels), value in sums[name].items():
            total.add_sample(CLUSTER + sample_name.removeprefix(PREFIX), dict(labels), value)
    return [f for f in (*labelled.values(), *totals.values()) if f.samples]


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


async def cluster_metrics(engine: RemoteEngine, jobs: object | None) -> bytes:
    replicas = sorted(members(engine.deployment))
    answers = await asyncio.gather(*(engine.replica_call(r, "metrics", SCRAPE_TIMEOUT_S) for r in replicas))
    texts = {a["replica"]: a["text"].decode() for a in answers if a is not None}
    families = merge(texts)
    families.append(GaugeMetricFamily("ca2vdm_cluster_replicas", "Engine replicas running", value=len(replicas)))
    families.append(GaugeMetricFamily("ca2vdm_cluster_replicas_scraped", "Engine replicas in this scrape",
                                      value=len(texts)))  # fmt: skip
    families.append(histogram("ca2vdm_cluster_resume_seconds", "Resume message to the first clip sent (ingress)",
                               engine.stats.resume_seconds))  # fmt: skip
    if jobs is not None:
        counts = await asyncio.to_thread(jobs.count_by_status)  # type: ignore[attr-defined]
        family = GaugeMetricFamily("ca2vdm_jobs", "REST video jobs by status", labels=["status"])
        for status, n in counts.items():
            family.add_metric([status], n)
        families.append(family)
    return exposition(families)


def exposition(families: list[Metric]) -> bytes:
    """Prometheus text of `families`."""
    registry = CollectorRegistry()
    registry.register(_Families(families))  # type: ignore[arg-type]
    return generate_latest(registry)
