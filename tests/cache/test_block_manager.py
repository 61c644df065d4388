"""Block manager and page rings: exact page ids, reference counts, dequeue without copies, forks, no leaks."""

from __future__ import annotations

import pytest

from server.cache.block_manager import BlockManager, OutOfPages, PageManager


def test_allocate_free_refcount():
    bm = BlockManager(4)
    a = bm.allocate(3)
    assert a == [0, 1, 2] and bm.num_free == 1
    bm.incref([1])
    bm.free([0, 1])
    assert bm.refcount(1) == 1 and bm.num_free == 2
    with pytest.raises(OutOfPages, match="need 3 pages, 2 of 4 free"):
        bm.allocate(3)
    assert bm.num_free == 2  # a refused request allocates nothing
    bm.free([1, 2])
    assert bm.num_free == 4
    with pytest.raises(AssertionError, match="double free"):
        bm.free([2])


def write(mgr, streams, num_frames):
    plan = mgr.plan_write(streams, num_frames)
    mgr.commit_write(streams, plan)
    return plan


def test_ring_dequeues_in_place():
    mgr = PageManager(num_pages=30, num_prefix_pages=6, num_prefix=3)
    st = mgr.new_stream(max_frames=25)
    write(mgr, [st], 1)
    for _ in range(3):
        write(mgr, [st], 8)
    assert st.num_cached == 25 and st.num_written == 25 and mgr.temporal.num_free == 5
    first_pages = list(st.ring[:8])
    plan = write(mgr, [st], 8)  # full queue, sole owner: frames 25..32 overwrite frames 0..7's pages
    assert plan.pages == [[first_pages[i] for i in [0, 1, 2, 3, 4, 5, 6, 7]]]
    assert st.num_written == 33 and st.num_cached == 25 and mgr.temporal.num_free == 5
    assert mgr.prefix.num_free == 3  # exactly num_prefix prefix pages per stream, reused in place
    mgr.release(st)
    assert mgr.temporal.num_free == 30 and mgr.prefix.num_free == 6


def test_fork_shares_pages_and_writers_take_fresh_ones():
    mgr = PageManager(num_pages=60, num_prefix_pages=12, num_prefix=3)
    a = mgr.new_stream(25)
    write(mgr, [a], 1)
    b = mgr.fork(a)  # same image and seed: frame 0 shared
    assert b.ring == a.ring and mgr.temporal.refcount(a.ring[0]) == 2
    assert all(mgr.prefix.refcount(p) == 2 for p in a.prefix)
    shared_prefix = list(a.prefix)
    write(mgr, [a, b], 8)  # batched write of two streams
    assert a.ring[0] == b.ring[0] and set(a.ring[1:]).isdisjoint(b.ring[1:])
    assert set(a.prefix).isdisjoint(b.prefix)  # shared prefix pages were not overwritten
    assert all(mgr.prefix.refcount(p) == 0 for p in shared_prefix)
    for _ in range(3):
        write(mgr, [a, b], 8)  # through the first dequeue: the shared frame 0 page is replaced, not reused
    assert mgr.temporal.refcount(b.ring[0]) == 1
    mgr.release(a)
    mgr.release(b)
    assert mgr.temporal.num_free == 60 and mgr.prefix.num_free == 12


def test_out_of_pages_is_reported_and_rolls_back():
    mgr = PageManager(num_pages=10, num_prefix_pages=6, num_prefix=3)
    a, b = mgr.new_stream(25), mgr.new_stream(25)
    write(mgr, [a], 1)
    with pytest.raises(OutOfPages):
        mgr.plan_write([a, b], 8)  # a needs 8, b needs 8: only 9 free
    assert mgr.temporal.num_free == 9 and mgr.prefix.num_free == 3 and a.num_written == 1


def test_many_streams_random_lifetimes_leak_nothing():
    import random

    rng = random.Random(0)
    mgr = PageManager(num_pages=400, num_prefix_pages=60, num_prefix=3)
    live = []
    for step in range(300):
        op = rng.random()
        if op < 0.2 or not live:
            st = mgr.new_stream(25)
            try:
                write(mgr, [st], 1)
            except OutOfPages:
                continue
            live.append(st)
        elif op < 0.3:
            live.append(mgr.fork(rng.choice(live)))
        elif op < 0.45:
            mgr.release(live.pop(rng.randrange(len(live))))
        else:
            batch = rng.sample(live, k=min(len(live), rng.randint(1, 4)))
            try:
                write(mgr, batch, 8)
            except OutOfPages:
                pass
        used = sum(1 for p in range(400) if mgr.temporal.refcount(p) > 0)
        held = {p for st in live for p in st.ring}
        assert used == len(held) == 400 - mgr.temporal.num_free, f"step {step}"
        for st in live:
            assert st.num_cached == min(st.num_written, 25)
    for st in live:
        mgr.release(st)
    assert mgr.temporal.num_free == 400 and mgr.prefix.num_free == 60


def test_first_frame_index_shares_and_evicts():
    from server.cache.block_manager import FirstFrameIndex

    mgr = PageManager(num_pages=40, num_prefix_pages=18, num_prefix=3)
    index = FirstFrameIndex(mgr, capacity=2)
    a = mgr.new_stream(25)
    write(mgr, [a], 1)
    key = ("sha256-of-image", 7, 50)  # image, seed, prefix perturbation
    index.insert(key, a)
    assert index.lookup(("other", 7, 50)) is None
    b = index.lookup(key)
    assert b is not None and b.ring == a.ring and b.prefix == a.prefix and b.num_written == 1
    assert mgr.temporal.refcount(a.ring[0]) == 3  # a, the index entry, b
    write(mgr, [a, b], 8)  # both continue independently from the shared frame
    assert a.ring[0] == b.ring[0] and set(a.ring[1:]).isdisjoint(b.ring[1:])
    for i in range(2):  # capacity 2: inserting two more drops the oldest entry
        c = mgr.new_stream(25)
        write(mgr, [c], 1)
        index.insert(("img", i, 50), c)
        mgr.release(c)
    assert len(index) == 2 and index.lookup(key) is None
    mgr.release(a)
    mgr.release(b)
    assert index.evict() == 2
    assert mgr.temporal.num_free == 40 and mgr.prefix.num_free == 18
