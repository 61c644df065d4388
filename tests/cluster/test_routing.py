"""The cluster's rules without a cluster: routing order, the autoscaling policy, merged metrics, the builder's
arguments. (tests/cluster/test_serve.py runs them on a real local Ray cluster.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ca2vdm.server.cluster import membership
from ca2vdm.server.cluster.app import split_args
from ca2vdm.server.cluster.autoscale import RealtimePolicy, desired_replicas
from ca2vdm.server.cluster.metrics import exposition, merge
from ca2vdm.server.cluster.remote import ENGINE_DEPLOYMENT, RemoteEngine
from ca2vdm.server.cluster.router import Ranking, Route, replica_of
from ca2vdm.server.engine.handle import ServerBusy
from ca2vdm.server.engine.session import SessionParams


def test_a_session_goes_back_to_the_replica_named_in_its_id_or_token():
    replicas = {"r1": {"spare": 0}, "r2": {"spare": 5}}
    ranking = Ranking()
    assert ranking.choose(Route(session="r1-s0a1b2-7"), replicas) == ["r1"]  # a session id
    assert ranking.choose(Route(session="r1.TOKEN-with-dashes_"), replicas) == ["r1"]  # a resume token
    assert ranking.choose(Route(replica="r2"), replicas) == ["r2"]
    # its replica is gone: every replica, most spare first (a resume is taken over where the session was saved)
    assert ranking.choose(Route(session="gone.TOKEN"), replicas) == ["r2", "r1"]
    assert replica_of("no-prefix") == "no" and replica_of("") == "" and replica_of(".x") == ""


def test_new_sessions_go_where_most_capacity_is_spare_and_full_or_leaving_replicas_come_last():
    ranking = Ranking()
    replicas = {"a": {"spare": 2}, "b": {"spare": 1}, "c": {"spare": 3, "draining": True}}
    assert ranking.choose(Route(new=True), replicas)[0] == "a"
    # the stats lag: what was sent since counts, so a burst spreads ("a": 2 - 1 = 1 ties "b": either may come first)
    second = ranking.choose(Route(new=True), replicas)
    assert set(second[:2]) == {"a", "b"} and second[2] == "c"
    third = ranking.choose(Route(new=True), replicas)
    assert third[-1] == "c"
    fresh = {"a": {"spare": 4}, "b": {"spare": 1}, "c": {"spare": 3, "draining": True}}  # new stats reset the count
    assert ranking.choose(Route(), fresh)[0] == "a"
    # a replica that refused the session (it was full) is tried last, with the leaving one
    assert ranking.choose(Route(avoid=("a",)), fresh) == ["b", "a", "c"]


def _ctx(live: dict, capacity: dict, current: int, lo: int = 1, hi: int = 8, state: dict | None = None):
    return SimpleNamespace(aggregated_metrics={"live_sessions": live, "realtime_capacity": capacity},
                           current_num_replicas=current, capacity_adjusted_min_replicas=lo,
                           capacity_adjusted_max_replicas=hi, policy_state=state or {})  # fmt: skip


def test_autoscaling_follows_live_sessions_over_realtime_capacity():
    assert desired_replicas(live=9, capacity_per_replica=4, current=1, target_utilization=0.75) == 3
    assert desired_replicas(live=0, capacity_per_replica=4, current=3, target_utilization=0.75) == 1
    policy = RealtimePolicy(target_utilization=0.75, downscale_periods=3)
    want, state = policy(_ctx({"r1": 4, "r2": 3}, {"r1": 4, "r2": 4}, current=2))
    assert want == 3  # 7 live sessions need 7 / (4 * 0.75) -> 3 replicas: up at once
    assert policy(_ctx({"r1": 4}, {"r1": 4}, current=2, hi=2))[0] == 2  # capped by max_replicas
    # down only after `downscale_periods` low decisions in a row, one replica at a time
    state: dict = {}
    decisions = []
    for _ in range(4):
        want, state = policy(_ctx({"r1": 0, "r2": 0, "r3": 1}, {"r1": 4, "r2": 4, "r3": 4}, current=3, state=state))
        decisions.append(want)
    assert decisions == [3, 3, 2, 3]
    # nothing reported yet: stay (at least min)
    assert policy(_ctx({}, {}, current=1, lo=2))[0] == 2
    with pytest.raises(ValueError):
        RealtimePolicy(target_utilization=0)


def test_metrics_of_replicas_are_labelled_and_summed():
    text_a = (
        "# TYPE ca2vdm_sessions_active gauge\nca2vdm_sessions_active 2.0\n"
        '# TYPE ca2vdm_resumes_total counter\nca2vdm_resumes_total{kind="exact"} 1.0\n'
        "# TYPE ca2vdm_batch_size histogram\n"
        'ca2vdm_batch_size_bucket{le="1.0"} 1.0\nca2vdm_batch_size_bucket{le="+Inf"} 3.0\n'
        "ca2vdm_batch_size_count 3.0\nca2vdm_batch_size_sum 5.0\n"
    )
    text_b = text_a.replace("2.0", "5.0").replace("} 1.0", "} 4.0")
    families = {f.name: f for f in merge({"a": text_a, "b": text_b})}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("ca2vdm_sessions_active", (("replica", "a"),))] == 2.0
    assert samples[("ca2vdm_sessions_active", (("replica", "b"),))] == 5.0
    assert samples[("ca2vdm_cluster_sessions_active", ())] == 7.0
    assert samples[("ca2vdm_cluster_resumes_total", (("kind", "exact"),))] == 5.0
    assert samples[("ca2vdm_cluster_batch_size_bucket", (("le", "+Inf"),))] == 6.0
    # the merged families print as valid exposition text
    assert len(list(text_string_to_metric_families(exposition(list(families.values())).decode()))) == len(families)


def test_the_builder_refuses_unknown_or_contradictory_arguments():
    options, settings = split_args({"replicas": 2, "model": "random:tiny", "max_sessions": 4})
    assert options.replicas == 2 and settings == {"model": "random:tiny", "max_sessions": 4}
    for bad in ({"replicaz": 2}, {"replicas": 2, "min_replicas": 1, "max_replicas": 3}, {"min_replicas": 1},
                {"min_replicas": 3, "max_replicas": 2}, {"max_sessions": 0}):  # fmt: skip
        with pytest.raises(ValueError):
            split_args(bad)


class _Replicas:
    """Engine replicas as the ingress's RemoteEngine calls them (a DeploymentHandle's shape), each with room for
    `room[id]` more sessions; a session's cancel gives its room back. Routing: the order of `room`, refusers last."""

    def __init__(self, room: dict[str, int], background_room: int = 100, silent: int = 0) -> None:
        self.room, self.background_room = room, background_room  # background sessions also need a background slot
        self.silent = silent  # offers that get no answer (a replica died or is being replaced)
        self.started: list[tuple[str, int]] = []  # (replica, seed) in order of admission
        self.open_stream = SimpleNamespace(remote=self._open)
        self.cancel = SimpleNamespace(remote=self._cancel)
        membership.publish(ENGINE_DEPLOYMENT, {rid: {"spare": n} for rid, n in room.items()})

    def options(self, **_) -> _Replicas:
        return self

    def _open(self, request: dict, route: Route):
        rid = next((r for r in self.room if r not in route.avoid), route.avoid[-1] if route.avoid else "a")

        async def answers():
            params = request["params"]
            if self.silent > 0:
                self.silent -= 1
                return
            if self.room[rid] <= 0 or (params.pace == "max" and self.background_room <= 0):
                yield {"full": True, "replica": rid}
                return
            self.room[rid] -= 1
            self.started.append((rid, params.seed))
            yield {"info": SimpleNamespace(session_id=f"{rid}-s{len(self.started)}"), "replica": rid,
                   "num_frames": None, "stream": f"{rid}-s{len(self.started)}#1"}  # fmt: skip

        return answers()

    async def _cancel(self, stream: str, route: Route) -> None:
        self.room[route.replica] += 1


def test_when_every_replica_is_full_a_session_waits_at_the_ingress_for_room_on_any_replica():
    """Both replicas full: joiners wait in order at the ingress and each takes the room the next leaver frees,
    whichever replica it was on; beyond max_waiting per replica they are refused at once, and a joiner that waits
    admission_wait_s in vain is refused too."""

    async def main() -> None:
        replicas = _Replicas({"a": 1, "b": 1})
        engine = RemoteEngine(replicas, max_waiting=1, admission_wait_s=2.0)
        first = [await engine.start_session(SessionParams(seed=seed)) for seed in (1, 2)]
        assert [h.replica for h in first] == ["a", "b"]
        waiting = [asyncio.create_task(engine.start_session(SessionParams(seed=seed))) for seed in (3, 4)]
        await asyncio.sleep(0.3)
        assert engine.num_waiting == 2 and not any(t.done() for t in waiting)
        with pytest.raises(ServerBusy, match="too many"):  # 2 replicas x max_waiting 1 already wait
            await engine.start_session(SessionParams(seed=5))
        first[1].cancel()  # room on b: the first joiner takes it, however recently b noticed
        third = await asyncio.wait_for(waiting[0], 1.0)
        assert third.replica == "b" and not waiting[1].done()
        first[0].cancel()
        assert (await asyncio.wait_for(waiting[1], 1.0)).replica == "a"
        assert [seed for _, seed in replicas.started] == [1, 2, 3, 4] and engine.num_waiting == 0
        started = asyncio.get_running_loop().time()
        with pytest.raises(ServerBusy, match="within 2 s"):
            await engine.start_session(SessionParams(seed=6))
        assert 1.9 < asyncio.get_running_loop().time() - started < 2.5 and engine.num_waiting == 0

    asyncio.run(main())


def test_a_waiting_job_holds_up_no_viewer_and_waits_without_a_deadline():
    """Live and background sessions wait in their own queues at the ingress (as in one engine): a job waiting for a
    background slot does not stop a viewer that finds room, and it is not refused after admission_wait_s."""

    async def main() -> None:
        replicas = _Replicas({"a": 2}, background_room=0)
        engine = RemoteEngine(replicas, max_waiting=2, admission_wait_s=0.5)
        job = asyncio.create_task(engine.start_session(SessionParams(seed=1, pace="max")))
        await asyncio.sleep(0.2)
        assert engine.num_waiting == 1
        viewer = await asyncio.wait_for(engine.start_session(SessionParams(seed=2)), 1.0)
        assert viewer.replica == "a"
        await asyncio.sleep(1.0)  # past admission_wait_s: the job still waits
        assert not job.done() and engine.num_waiting == 1
        replicas.background_room = 1
        assert (await asyncio.wait_for(job, 1.0)).replica == "a"
        assert [seed for _, seed in replicas.started] == [2, 1]

    asyncio.run(main())


def test_a_replica_that_does_not_answer_an_offer_counts_as_full_for_that_round():
    async def main() -> None:
        replicas = _Replicas({"a": 1}, silent=2)
        engine = RemoteEngine(replicas, max_waiting=1, admission_wait_s=5.0)
        handle = await asyncio.wait_for(engine.start_session(SessionParams(seed=7)), 2.0)
        assert handle.replica == "a" and replicas.silent == 0

    asyncio.run(main())


def test_the_ingress_lets_as_many_wait_as_the_replicas_queues_would():
    """max_waiting per replica beyond their free slots (a session with a slot but no real-time capacity yet waits,
    as in one engine's queue)."""
    membership.publish(ENGINE_DEPLOYMENT, {"a": {"spare": 0, "free_slots": 3}, "b": {"spare": 0, "free_slots": 1}})
    assert RemoteEngine(None, max_waiting=2).wait_limit() == 2 * 2 + 4
    membership.publish(ENGINE_DEPLOYMENT, {"a": {"spare": 0, "free_slots": 0}})
    assert RemoteEngine(None, max_waiting=0).wait_limit() == 0
