"""Block manager and page rings: exact page ids, dequeue without copies, transactional writes, no leaks."""

from __future__ import annotations

import random

import pytest

from ca2vdm.server.cache.block_manager import BlockManager, OutOfPages, PageManager


def test_allocate_and_free():
    bm = BlockManager(4)
    a = bm.allocate(3)
    assert a == [0, 1, 2] and bm.num_free == 1 and bm.is_used(1)
    bm.free([0, 1])
    assert bm.num_free == 3 and not bm.is_used(1)
    with pytest.raises(OutOfPages, match="need 4 pages, 3 of 4 free"):
        bm.allocate(4)
    assert bm.num_free == 3  # a refused request allocates nothing
    bm.free([2])
    assert bm.num_free == 4
    with pytest.raises(AssertionError, match="double free"):
        bm.free([2])


def write(mgr, streams, num_frames):
    plan = mgr.plan_write(streams, num_frames)
    mgr.commit_write(streams, plan)
    return plan


def test_ring_dequeues_in_place():
    mgr = PageManager(num_pages=30, num_prefix_pages=6, num_prefix=3, max_frames=25)
    st = mgr.new_stream()
    write(mgr, [st], 1)
    for _ in range(3):
        write(mgr, [st], 8)
    assert st.num_cached == 25 and st.num_written == 25 and mgr.temporal.num_free == 5
    first_pages = list(st.ring[:8])
    plan = write(mgr, [st], 8)  # full queue: frames 25..32 overwrite frames 0..7's pages
    assert plan.pages == [first_pages] and plan.fresh == []
    assert st.num_written == 33 and st.num_cached == 25 and mgr.temporal.num_free == 5
    assert mgr.prefix.num_free == 3  # exactly num_prefix prefix pages per stream, reused in place
    plan = write(mgr, [st], 8)  # frames 33..40 sit in slots 8..15
    assert plan.pages == [st.ring[8:16]]
    mgr.release(st)
    assert mgr.temporal.num_free == 30 and mgr.prefix.num_free == 6


def test_a_write_that_crosses_the_queue_end_grows_then_wraps():
    mgr = PageManager(num_pages=25, num_prefix_pages=3, num_prefix=3, max_frames=25)
    st = mgr.new_stream()
    for frames in (1, 8, 8, 4):
        write(mgr, [st], frames)
    assert st.num_cached == 21
    plan = write(mgr, [st], 8)  # frames 21..24 take the last 4 free pages, 25..28 reuse slots 0..3
    assert len(plan.fresh) == 4 and plan.pages[0][4:] == st.ring[:4] and mgr.temporal.num_free == 0


def test_out_of_pages_is_reported_and_rolls_back():
    mgr = PageManager(num_pages=10, num_prefix_pages=6, num_prefix=3, max_frames=25)
    a, b = mgr.new_stream(), mgr.new_stream()
    write(mgr, [a], 1)
    with pytest.raises(OutOfPages):
        mgr.plan_write([a, b], 8)  # a needs 8, b needs 8: only 9 free
    assert mgr.temporal.num_free == 9 and mgr.prefix.num_free == 3 and a.num_written == 1


def test_an_aborted_write_frees_what_it_allocated_and_changes_no_ring():
    mgr = PageManager(num_pages=60, num_prefix_pages=6, num_prefix=3, max_frames=25)
    a, b = mgr.new_stream(), mgr.new_stream()
    write(mgr, [a], 1)
    ring = list(a.ring)
    plan = mgr.plan_write([a, b], 8)  # a grows by 8; b is new: 8 pages and its 3 prefix pages
    assert len(plan.fresh) == 16 and len(plan.fresh_prefix) == 3
    mgr.abort_write(plan)
    assert a.ring == ring and a.num_written == 1 and b.ring == [] and b.prefix == []
    assert mgr.temporal.num_free == 59 and mgr.prefix.num_free == 3


def test_many_streams_random_lifetimes_leak_nothing():
    rng = random.Random(0)
    mgr = PageManager(num_pages=400, num_prefix_pages=60, num_prefix=3, max_frames=25)
    live = []
    for step in range(300):
        op = rng.random()
        if op < 0.2 or not live:
            st = mgr.new_stream()
            try:
                write(mgr, [st], 1)
            except OutOfPages:
                continue
            live.append(st)
        elif op < 0.35:
            mgr.release(live.pop(rng.randrange(len(live))))
        else:
            batch = rng.sample(live, k=min(len(live), rng.randint(1, 4)))
            try:
                plan = mgr.plan_write(batch, 8)
            except OutOfPages:
                continue
            if rng.random() < 0.2:
                mgr.abort_write(plan)  # the forward failed
            else:
                mgr.commit_write(batch, plan)
        used = sum(1 for p in range(400) if mgr.temporal.is_used(p))
        held = [p for st in live for p in st.ring]
        assert used == len(held) == len(set(held)) == 400 - mgr.temporal.num_free, f"step {step}"
        for st in live:
            assert st.num_cached == min(st.num_written, 25)
    for st in live:
        mgr.release(st)
    assert mgr.temporal.num_free == 400 and mgr.prefix.num_free == 60
