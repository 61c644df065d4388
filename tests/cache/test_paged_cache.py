"""The model over the paged pool: one batched forward of streams with different cache lengths and timesteps
equals each stream run alone on the dense cache (fp32, < 1e-5), through dequeue and TPE wrap, and after
batched writes that reuse pages in place."""

from __future__ import annotations

import pytest
import torch

from ca2vdm.server.cache.block_manager import OutOfPages, PageManager
from ca2vdm.server.cache.paged import PagedKVCache
from ca2vdm.server.cache.pool import KVPool
from ca2vdm.server.model.cache import DenseKVCache
from ca2vdm.server.model.config import ModelConfig
from ca2vdm.server.model.stdit import CausalSTDiT

CFG = ModelConfig(input_size=(8, 8, 8), in_channels=4, hidden_size=32, depth=2, num_heads=2)
P_MAX, CHUNK = 25, 8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model():
    # fp32 means fp32 on GPUs too: TF32 convolutions would differ between batch sizes by ~1e-4
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return CausalSTDiT(CFG).randomize_(0).to(DEVICE).eval()


def test_batched_forward_equals_single_streams(model):
    gen = torch.Generator().manual_seed(0)
    pool = KVPool.for_sessions(CFG, 5, P_MAX, DEVICE, torch.float32)
    mgr = PageManager(pool.num_pages, pool.num_prefix_pages, CFG.prefix_frames, P_MAX)
    histories = [0, 1, 2, 4, 5]  # chunks after the first frame: 1, 9, 17, 33 (dequeued), 41 (TPE wrapped)
    streams, dense = [], []
    for num_chunks in histories:
        st, d = mgr.new_stream(), DenseKVCache.for_model(model, 1, P_MAX)
        for w in range(num_chunks + 1):
            x = torch.randn(1, 4, 1 if w == 0 else CHUNK, 8, 8, generator=gen).to(DEVICE)
            model.write(PagedKVCache(pool, mgr, [st], backend="triton"), x)
            model.write(d, x)
        streams.append(st)
        dense.append(d)
    batch = PagedKVCache(pool, mgr, streams, backend="triton")  # the kernels (interpreted on CPU)
    assert batch.num_cached().tolist() == [1, 9, 17, 25, 25]
    assert batch.positions().tolist() == [1, 9, 17, 33, 41]
    for _ in range(2):  # denoise, then a batched write (in-place page reuse for the full streams), again
        x = torch.randn(5, 4, CHUNK, 8, 8, generator=gen).to(DEVICE)
        t = torch.randint(0, 1000, (5,), generator=gen).to(DEVICE)
        out = model.denoise(batch, x, t)
        for i in range(5):
            assert rel_err(out[i : i + 1], model.denoise(dense[i], x[i : i + 1], t[i : i + 1])) < 1e-5, i
        clean = torch.randn(5, 4, CHUNK, 8, 8, generator=gen).to(DEVICE)
        model.write(batch, clean)
        for i in range(5):
            model.write(dense[i], clean[i : i + 1])
    for st in streams:
        mgr.release(st)
    assert mgr.temporal.num_free == pool.num_pages and mgr.prefix.num_free == pool.num_prefix_pages


def test_torch_backend_matches_kernels(model):
    gen = torch.Generator().manual_seed(1)
    pool = KVPool.for_sessions(CFG, 2, P_MAX, DEVICE, torch.float32)
    mgr = PageManager(pool.num_pages, pool.num_prefix_pages, CFG.prefix_frames, P_MAX)
    streams = [mgr.new_stream(), mgr.new_stream()]
    model.write(PagedKVCache(pool, mgr, streams), torch.randn(2, 4, 1, 8, 8, generator=gen).to(DEVICE))
    x, t = torch.randn(2, 4, CHUNK, 8, 8, generator=gen).to(DEVICE), torch.tensor([3, 700], device=DEVICE)
    a = model.denoise(PagedKVCache(pool, mgr, streams, backend="triton"), x, t)
    b = model.denoise(PagedKVCache(pool, mgr, streams, backend="torch"), x, t)
    c = model.denoise(PagedKVCache(pool, mgr, streams, backend="triton", prefix_kernel="triton"), x, t)
    assert rel_err(a, b) < 1e-5 and rel_err(c, b) < 1e-5


def test_out_of_pages_leaves_streams_intact(model):
    pool = KVPool(CFG, num_pages=10, num_prefix_pages=6, device=DEVICE, dtype=torch.float32)
    mgr = PageManager(pool.num_pages, pool.num_prefix_pages, CFG.prefix_frames, P_MAX)
    streams = [mgr.new_stream(), mgr.new_stream()]
    cache = PagedKVCache(pool, mgr, streams)
    model.write(cache, torch.randn(2, 4, 1, 8, 8, device=DEVICE))
    with pytest.raises(OutOfPages):
        model.write(cache, torch.randn(2, 4, CHUNK, 8, 8, device=DEVICE))
    assert [st.num_written for st in streams] == [1, 1] and mgr.temporal.num_free == 8


def test_a_failed_write_forward_gives_its_pages_back(model, monkeypatch):
    pool = KVPool.for_sessions(CFG, 2, P_MAX, DEVICE, torch.float32)
    mgr = PageManager(pool.num_pages, pool.num_prefix_pages, CFG.prefix_frames, P_MAX)
    cache = PagedKVCache(pool, mgr, [mgr.new_stream(), mgr.new_stream()])
    model.write(cache, torch.randn(2, 4, 1, 8, 8, device=DEVICE))
    calls = {"n": 0}
    store = cache.store

    def failing_store(layer, *args):
        calls["n"] += 1
        if layer == 1:
            raise RuntimeError("device fault")
        store(layer, *args)

    monkeypatch.setattr(cache, "store", failing_store)
    with pytest.raises(RuntimeError, match="device fault"):
        model.write(cache, torch.randn(2, 4, CHUNK, 8, 8, device=DEVICE))
    assert calls["n"] == 2 and [st.num_written for st in cache.streams] == [1, 1]
    assert mgr.temporal.num_free == pool.num_pages - 2  # the 16 pages planned for the chunk are free again
    monkeypatch.undo()
    model.write(cache, torch.randn(2, 4, CHUNK, 8, 8, device=DEVICE))  # the cache takes writes again
    assert [st.num_written for st in cache.streams] == [9, 9]


def test_fixed_row_tables_pad_and_reload(model):
    """A cache with more rows than streams (as a CUDA graph's bucket): padded rows read an empty queue and write
    the scratch pages, the real rows equal a cache of exactly the streams, and `load` points the same tables at
    another batch."""
    gen = torch.Generator().manual_seed(2)
    pool = KVPool.for_sessions(CFG, 3, P_MAX, DEVICE, torch.float32)
    mgr = PageManager(pool.num_pages, pool.num_prefix_pages, CFG.prefix_frames, P_MAX)
    streams = [mgr.new_stream() for _ in range(3)]
    padded = PagedKVCache(pool, mgr, streams[:2], rows=4, backend="torch")
    model.write(padded, torch.randn(4, 4, 1, 8, 8, generator=gen).to(DEVICE))
    model.write(padded, torch.randn(4, 4, CHUNK, 8, 8, generator=gen).to(DEVICE))
    model.write(PagedKVCache(pool, mgr, streams[2:]), torch.randn(1, 4, 1, 8, 8, generator=gen).to(DEVICE))
    padded.backend = "triton"  # the kernels read the padded rows' empty queues
    assert [st.num_written for st in streams] == [9, 9, 1]
    assert mgr.temporal.num_free == pool.num_pages - 19  # padded rows took no page
    assert padded.num_cached().tolist() == [9, 9, 0, 0]
    x = torch.randn(4, 4, CHUNK, 8, 8, generator=gen).to(DEVICE)
    t = torch.tensor([5, 900, 17, 400], device=DEVICE)
    for batch in (streams[:2], [streams[2], streams[0]]):
        padded.load(batch)
        n = len(batch)
        out = model.denoise(padded, x, t)[:n]
        exact = model.denoise(PagedKVCache(pool, mgr, batch, backend="torch"), x[:n], t[:n])
        assert rel_err(out, exact) < 1e-5
        assert padded.positions().tolist()[:n] == [st.num_written for st in batch]


def test_pool_sizing():
    xl = ModelConfig()
    page = KVPool.page_bytes(xl, torch.bfloat16)
    assert page == 28 * 2 * 256 * 1152 * 2  # one frame, all layers, K and V: 33 MB
    assert 25 * page / 2**30 == pytest.approx(0.77, abs=0.01)  # the paper's 0.77 GiB temporal cache
    with torch.device("meta"):
        pool = KVPool.for_budget(xl, 64 * 28 * page, P_MAX, "meta", torch.bfloat16)
    assert pool.num_pages == 64 * P_MAX and pool.num_prefix_pages == 64 * 3
