"""Tests for server.model.diffusion against an independent float64 implementation written from the math.

The oracle below works one batch element at a time with Python-float schedule values and uses the
textbook forms (Ho et al. eq. 11 for the mean, a power form for the learned-range standard deviation),
not the folded coefficient tables of the module, so agreement is evidence of the same mathematics
rather than of the same code.
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

from ca2vdm.server.model.diffusion import (
    DEFAULT_STEPS,
    DDIMSampler,
    DPMSolverPP2MSampler,
    IDDPMSampler,
    Sampler,
    classifier_free_guidance,
    linear_betas,
    log_snr_timesteps,
    make_sampler,
    space_timesteps,
)

T_TRAIN = 1000
STEP_COUNTS = [1, 7, 25, 100, 1000]
SHAPE = (4, 2, 3, 3)  # (C, T, H, W), kept small so 1000-element batches stay fast


# ---------------------------------------------------------------------------------------------------------
# Independent oracle
# ---------------------------------------------------------------------------------------------------------


def _alpha_bars(num_train: int = T_TRAIN) -> list[float]:
    scale = 1000.0 / num_train
    lo, hi = 1e-4 * scale, 0.02 * scale
    out, prod = [], 1.0
    for i in range(num_train):
        beta = lo + (hi - lo) * i / (num_train - 1) if num_train > 1 else lo
        prod *= 1.0 - beta
        out.append(prod)
    return out


ALPHA_BARS = _alpha_bars()


def _spacing(num_train: int, n: int) -> list[int]:
    """Evenly strided respacing, with the fractional position accumulated step by step."""
    step = (num_train - 1) / (n - 1) if n > 1 else 1.0
    pos, picked = 0.0, []
    for _ in range(n):
        picked.append(int(round(pos)))
        pos += step
    return sorted(set(picked))


def _ab(used: list[int], k: int) -> tuple[float, float]:
    """alpha_bar at respaced index k and at k - 1 (1.0 before the first index)."""
    return ALPHA_BARS[used[k]], (ALPHA_BARS[used[k - 1]] if k > 0 else 1.0)


def _ref_iddpm(x, eps, v, noise, k: int, used: list[int]) -> torch.Tensor:
    """One respaced ancestral step for a single element, float64."""
    ab, ab_prev = _ab(used, k)
    beta = 1.0 - ab / ab_prev
    # Ho et al. eq. 11: mu = (x - beta / sqrt(1 - ab) * eps) / sqrt(1 - beta)
    mean = (x - beta / math.sqrt(1.0 - ab) * eps) / math.sqrt(1.0 - beta)
    # cross-check the oracle itself: posterior mean of q(x_{k-1} | x_k, x0) with x0 recovered from eps
    x0 = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
    post_mean = (math.sqrt(ab_prev) * beta * x0 + math.sqrt(1.0 - beta) * (1.0 - ab_prev) * x) / (1.0 - ab)
    torch.testing.assert_close(mean, post_mean, rtol=1e-9, atol=1e-9)
    if k == 0:
        return mean
    post_var = (1.0 - ab_prev) / (1.0 - ab) * beta  # k > 0, so the k = 0 clipping never applies here
    frac = (v + 1.0) / 2.0
    # exp(0.5 * (frac * log beta + (1 - frac) * log post_var)) in power form
    std = beta ** (frac / 2.0) * post_var ** ((1.0 - frac) / 2.0)
    return mean + std * noise


def _ref_ddim(x, eps, noise, k: int, used: list[int], eta: float) -> torch.Tensor:
    ab, ab_prev = _ab(used, k)
    x0 = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
    sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
    out = math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)) * eps
    if k > 0 and eta > 0:
        out = out + sigma * noise
    return out


def _random_inputs(ks: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    b, c = len(ks), SHAPE[0]
    x = torch.randn(b, *SHAPE, generator=g)
    eps = torch.randn(b, *SHAPE, generator=g)
    var = torch.tanh(2.0 * torch.randn(b, *SHAPE, generator=g))
    noise = torch.randn(b, *SHAPE, generator=g)
    model_out = torch.cat([eps, var], dim=1)
    assert model_out.shape[1] == 2 * c
    return x, model_out, noise


def _index_batches(n: int, seed: int) -> list[torch.Tensor]:
    """Every index once in shuffled order, plus a batch of random (repeating) indices incl. both ends."""
    g = torch.Generator().manual_seed(seed)
    every = torch.randperm(n, generator=g)
    rand = torch.randint(0, n, (9,), generator=g)
    rand[0], rand[-1] = 0, n - 1
    return [every, rand]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------------------
# Schedule and spacing
# ---------------------------------------------------------------------------------------------------------


def test_linear_betas():
    b = linear_betas()
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b500 = linear_betas(500)
    assert b500[0].item() == pytest.approx(2e-4) and b500[-1].item() == pytest.approx(0.04)
    ab = torch.cumprod(1 - b, 0)
    assert ab.tolist() == pytest.approx(ALPHA_BARS, rel=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 21, 25, 50, 100, 250, 999, 1000])
def test_space_timesteps_shape_and_endpoints(n):
    ts = space_timesteps(T_TRAIN, n)
    assert len(ts) == n
    assert ts == sorted(set(ts))
    assert ts[0] == 0
    if n > 1:
        assert ts[-1] == T_TRAIN - 1
    assert ts == _spacing(T_TRAIN, n)


def test_space_timesteps_known_values():
    assert space_timesteps(1000, 1) == [0]
    assert space_timesteps(1000, 2) == [0, 999]
    assert space_timesteps(1000, 4) == [0, 333, 666, 999]
    # 249.75 * i: 499.5 rounds half to even
    assert space_timesteps(1000, 5) == [0, 250, 500, 749, 999]
    # 166.5 * i: 166.5 -> 166, 499.5 -> 500, 832.5 -> 832
    assert space_timesteps(1000, 7) == [0, 166, 333, 500, 666, 832, 999]
    assert space_timesteps(1000, 1000) == list(range(1000))


@pytest.mark.parametrize("n", [0, -3, 1001])
def test_space_timesteps_rejects_bad_counts(n):
    with pytest.raises(ValueError, match="num_steps"):
        space_timesteps(1000, n)


def test_sampler_tables():
    s = IDDPMSampler(25)
    assert s.num_steps == 25 and s.num_train_steps == 1000
    assert s.timesteps.dtype == torch.long and s.timesteps.shape == (25,)
    assert s.timesteps.tolist() == space_timesteps(1000, 25)
    assert s.to("cpu") is s


# ---------------------------------------------------------------------------------------------------------
# Steps against the oracle
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", STEP_COUNTS)
def test_iddpm_step_matches_oracle(n):
    sampler = IDDPMSampler(n)
    used = sampler.timesteps.tolist()
    for j, ks in enumerate(_index_batches(n, seed=n)):
        x, model_out, noise = _random_inputs(ks, seed=100 * n + j)
        got = sampler.step(x, model_out, ks, noise)
        assert got.dtype == torch.float32 and got.shape == x.shape
        c = SHAPE[0]
        for i, k in enumerate(ks.tolist()):
            want = _ref_iddpm(
                x[i].double(),
                model_out[i, :c].double(),
                model_out[i, c:].double(),
                noise[i].double(),
                k,
                used,
            )
            err = _rel_err(got[i], want)
            assert err < 1e-5, f"n={n} k={k}: relative error {err:.2e}"


@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_oracle(n, eta):
    sampler = DDIMSampler(n, eta=eta)
    assert sampler.needs_noise == (eta > 0)
    used = sampler.timesteps.tolist()
    for j, ks in enumerate(_index_batches(n, seed=7 * n)):
        x, model_out, noise = _random_inputs(ks, seed=200 * n + j)
        got = sampler.step(x, model_out, ks, noise)
        assert got.dtype == torch.float32 and got.shape == x.shape
        c = SHAPE[0]
        for i, k in enumerate(ks.tolist()):
            want = _ref_ddim(x[i].double(), model_out[i, :c].double(), noise[i].double(), k, used, eta)
            err = _rel_err(got[i], want)
            assert err < 1e-5, f"n={n} k={k} eta={eta}: relative error {err:.2e}"


def test_iddpm_variance_endpoints():
    """v = -1 gives the posterior std, v = +1 gives sqrt(beta) (zero mean from x_t = eps = 0)."""
    n = 7
    s = IDDPMSampler(n)
    used = s.timesteps.tolist()
    x = torch.zeros(2, *SHAPE)
    zeros = torch.zeros(2, *SHAPE)
    noise = torch.ones(2, *SHAPE)
    k = torch.tensor([3, 3])
    ab, ab_prev = _ab(used, 3)
    beta = 1 - ab / ab_prev
    post_var = (1 - ab_prev) / (1 - ab) * beta
    for v, want in [(-1.0, math.sqrt(post_var)), (1.0, math.sqrt(beta))]:
        out = s.step(x, torch.cat([zeros, torch.full_like(zeros, v)], 1), k, noise)
        assert out.flatten().tolist() == pytest.approx([want] * out.numel(), rel=1e-5)


def test_ddim_ignores_variance_and_noise():
    s = DDIMSampler(25)
    ks = torch.tensor([0, 5, 24])
    x, model_out, noise = _random_inputs(ks, seed=3)
    a = s.step(x, model_out, ks)
    other = model_out.clone()
    other[:, SHAPE[0] :] = -other[:, SHAPE[0] :]
    b = s.step(x, other, ks, noise)
    assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [IDDPMSampler, DDIMSampler])
def test_batched_step_equals_per_element(cls):
    s = cls(25)
    ks = torch.tensor([24, 0, 13, 13, 1, 7])
    x, model_out, noise = _random_inputs(ks, seed=11)
    batched = s.step(x, model_out, ks, noise)
    rows = [s.step(x[i : i + 1], model_out[i : i + 1], ks[i : i + 1], noise[i : i + 1]) for i in range(6)]
    single = torch.cat(rows)
    torch.testing.assert_close(batched, single, rtol=1e-6, atol=1e-6)
    # a Python int index is the same as a constant tensor
    const = torch.full((6,), 13)
    torch.testing.assert_close(s.step(x, model_out, 13, noise), s.step(x, model_out, const, noise))


def test_iddpm_k0_adds_no_noise():
    s = IDDPMSampler(100)
    ks = torch.zeros(4, dtype=torch.long)
    x, model_out, noise = _random_inputs(ks, seed=5)
    a = s.step(x, model_out, ks, noise)
    b = s.step(x, model_out, ks, 10 * torch.randn_like(noise))
    assert torch.equal(a, b)
    # and it is the posterior mean, i.e. the step with zero noise
    assert torch.equal(a, s.step(x, model_out, ks, torch.zeros_like(noise)))


def test_step_works_on_meta_device():
    """Meta tensors have no data, so this fails on any host read (.item(), .tolist(), printing values)."""
    for s in (IDDPMSampler(7), DDIMSampler(7)):
        assert s.to("meta") is s
        x = torch.empty(3, *SHAPE, device="meta")
        model_out = torch.empty(3, 2 * SHAPE[0], *SHAPE[1:], device="meta")
        k = torch.empty(3, dtype=torch.long, device="meta")
        out = s.step(x, model_out, k, torch.empty_like(x))
        assert out.device.type == "meta" and out.shape == x.shape and out.dtype == torch.float32
        assert s.q_sample(x, k, torch.empty_like(x)).device.type == "meta"


# ---------------------------------------------------------------------------------------------------------
# Forward noising and prefix perturbation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [7, 100])
def test_q_sample_formula(n):
    s = DDIMSampler(n)
    used = s.timesteps.tolist()
    ks = torch.tensor([0, n // 2, n - 1])
    x0, _, noise = _random_inputs(ks, seed=21)
    got = s.q_sample(x0, ks, noise)
    for i, k in enumerate(ks.tolist()):
        ab = ALPHA_BARS[used[k]]
        want = math.sqrt(ab) * x0[i].double() + math.sqrt(1 - ab) * noise[i].double()
        assert _rel_err(got[i], want) < 1e-6


def test_q_sample_statistics():
    s = IDDPMSampler(100)
    k = 40
    ab = ALPHA_BARS[s.timesteps[k].item()]
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((2, 1, 100, 100, 20), 0.7)
    xk = s.q_sample(x0, torch.tensor([k, k]), torch.randn(x0.shape, generator=g))
    assert xk.mean().item() == pytest.approx(0.7 * math.sqrt(ab), abs=5e-3)
    assert xk.std().item() == pytest.approx(math.sqrt(1 - ab), rel=5e-3)


def test_perturb_index():
    # t_p = 50 as in the reference inference configs
    assert IDDPMSampler(100).perturb_index(50) == 5
    assert IDDPMSampler(1000).perturb_index(50) == 50
    s25 = DDIMSampler(25)
    assert s25.perturb_index(50) == 1 and s25.timesteps[1].item() == 42
    assert IDDPMSampler(7).perturb_index(50) is None  # rounds to index 0
    assert IDDPMSampler(100).perturb_index(0) is None
    assert IDDPMSampler(100).perturb_index(-1) is None
    assert IDDPMSampler(100).perturb_index(999) == 99
    with pytest.raises(ValueError):
        IDDPMSampler(100).perturb_index(1000)


# ---------------------------------------------------------------------------------------------------------
# Explicit timesteps and the reference's float32 schedule
# ---------------------------------------------------------------------------------------------------------


def test_explicit_timesteps():
    """A chain over given training timesteps (the reference's respacing keeps any set, e.g. {0, 50, 999})."""
    # the timesteps a spacing would pick give exactly that sampler
    for cls, n, spacing in ((IDDPMSampler, 25, space_timesteps), (DDIMSampler, 7, space_timesteps),
                            (DPMSolverPP2MSampler, 6, log_snr_timesteps)):  # fmt: skip
        a, b = cls(n), cls(n, timesteps=spacing(T_TRAIN, n))
        assert torch.equal(a._step_table, b._step_table) and torch.equal(a._q_table, b._q_table)
        assert torch.equal(a.timesteps, b.timesteps)
    s = IDDPMSampler.from_timesteps([999, 0, 50])  # any order
    assert type(s) is IDDPMSampler and s.num_steps == 3 and s.timesteps.tolist() == [0, 50, 999]
    used = [0, 50, 999]
    ks = torch.tensor([0, 1, 2, 2, 1])
    x, model_out, noise = _random_inputs(ks, seed=31)
    got = s.step(x, model_out, ks, noise)
    c = SHAPE[0]
    for i, k in enumerate(ks.tolist()):
        want = _ref_iddpm(x[i].double(), model_out[i, :c].double(), model_out[i, c:].double(), noise[i].double(), k,
                          used)  # fmt: skip
        assert _rel_err(got[i], want) < 1e-5
    d = DDIMSampler.from_timesteps(used, eta=0.5)
    assert d.eta == 0.5 and d.timesteps.tolist() == used
    got = d.step(x, model_out, ks, noise)
    for i, k in enumerate(ks.tolist()):
        assert (
            _rel_err(got[i], _ref_ddim(x[i].double(), model_out[i, :c].double(), noise[i].double(), k, used, 0.5))
            < 1e-5
        )
    assert IDDPMSampler.from_timesteps([0, 50, 999]).perturb_index(50) is None  # int(50 * 3 / 1000) = 0


@pytest.mark.parametrize(
    ("timesteps", "num_steps"), [([0, 0, 5], 3), ([0, 1000], 2), ([-1, 5], 2), ([0, 2.5], 2), ([True, 5], 2),
                                 ([], 0), ([0, 5, 9], 4)],
)  # fmt: skip
def test_explicit_timesteps_rejects_bad_lists(timesteps, num_steps):
    with pytest.raises(ValueError, match="timesteps"):
        IDDPMSampler(num_steps, timesteps=timesteps)


def _f32(value: float) -> float:
    """Round a Python float to the nearest float32."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _float32_schedule(used: list[int]) -> tuple[list[float], list[float]]:
    """The reference's respaced schedule: betas rounded to float32, alpha_bar the running product of the float32
    1 - beta (exact in a Python float, then rounded once: float32 math), accumulated in double and rounded to
    float32 at each index, as torch's float32 cumprod does on the CPU."""
    betas, alpha_bars, prev, acc = [], [], 1.0, 1.0
    for t in used:
        beta = _f32(1.0 - ALPHA_BARS[t] / prev)
        prev = ALPHA_BARS[t]
        acc *= _f32(1.0 - beta)
        betas.append(beta)
        alpha_bars.append(_f32(acc))
    return alpha_bars, betas


def _ref_iddpm_posterior(x, eps, v, noise, k: int, alpha_bars: list[float], betas: list[float]) -> torch.Tensor:
    """One step in the posterior form (x0 from eps, then the posterior mean), for a schedule whose beta is not
    exactly 1 - alpha_bar / alpha_bar_prev."""
    ab, beta = alpha_bars[k], betas[k]
    ab_prev = alpha_bars[k - 1] if k > 0 else 1.0
    x0 = (x - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
    mean = (beta * math.sqrt(ab_prev) * x0 + (1.0 - ab_prev) * math.sqrt(1.0 - beta) * x) / (1.0 - ab)
    if k == 0:
        return mean
    post_var = beta * (1.0 - ab_prev) / (1.0 - ab)
    frac = (v + 1.0) / 2.0
    return mean + beta ** (frac / 2.0) * post_var ** ((1.0 - frac) / 2.0) * noise


@pytest.mark.parametrize("used", [[0, 50, 999], space_timesteps(T_TRAIN, 100)])
def test_iddpm_float32_schedule(used):
    s = IDDPMSampler.from_timesteps(used, float32_schedule=True)
    assert s.float32_schedule and not IDDPMSampler(7).float32_schedule
    alpha_bars, betas = _float32_schedule(used)
    assert s._q_table[0].tolist() == [_f32(math.sqrt(ab)) for ab in alpha_bars]
    assert s._q_table[1].tolist() == pytest.approx([math.sqrt(1.0 - ab) for ab in alpha_bars], rel=1e-7)
    n = len(used)
    ks = torch.tensor([0, 1, n - 1, n // 2, 0])
    x, model_out, noise = _random_inputs(ks, seed=41)
    got = s.step(x, model_out, ks, noise)
    c = SHAPE[0]
    for i, k in enumerate(ks.tolist()):
        want = _ref_iddpm_posterior(x[i].double(), model_out[i, :c].double(), model_out[i, c:].double(),
                                    noise[i].double(), k, alpha_bars, betas)  # fmt: skip
        assert _rel_err(got[i], want) < 1e-6, f"k={k}"
    # it is not the float64 schedule: the last step's x0 coefficient beta / (1 - alpha_bar) is 1.7e-4 below 1
    exact = IDDPMSampler.from_timesteps(used)
    assert _rel_err(s.step(x[:1], model_out[:1], 0, noise[:1]), exact.step(x[:1], model_out[:1], 0, noise[:1])) > 1e-4


# ---------------------------------------------------------------------------------------------------------
# Loop, guidance, factory, validation
# ---------------------------------------------------------------------------------------------------------


def _toy_model(calls: list[list[int]]):
    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.tolist())
        return torch.cat([0.5 * x + 0.001 * t.view(-1, 1, 1, 1, 1), torch.tanh(x)], dim=1)

    return model_fn


@pytest.mark.parametrize("cls", [IDDPMSampler, DDIMSampler])
def test_sample_loop_deterministic(cls):
    s = cls(25)
    x_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    calls: list[list[int]] = []
    a = s.sample_loop(_toy_model(calls), x_T, generator=torch.Generator().manual_seed(9))
    assert calls == [[t, t] for t in reversed(space_timesteps(1000, 25))]
    b = s.sample_loop(_toy_model([]), x_T, generator=torch.Generator().manual_seed(9), progress=True)
    assert torch.equal(a, b) and a.dtype == torch.float32 and torch.isfinite(a).all()
    c = s.sample_loop(_toy_model([]), x_T, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, c) == (not s.needs_noise)


def test_sample_loop_equals_manual_steps():
    s = IDDPMSampler(7)
    x_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2))
    model_fn = _toy_model([])
    looped = s.sample_loop(model_fn, x_T, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    x = x_T
    for k in range(6, -1, -1):
        kk = torch.full((3,), k)
        x = s.step(x, model_fn(x, s.timesteps[kk]), kk, torch.randn(x.shape, generator=g))
    torch.testing.assert_close(looped, x, rtol=0, atol=0)


def test_classifier_free_guidance():
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 8, 2, 3, 3, generator=g)
    uncond = torch.randn(2, 8, 2, 3, 3, generator=g)
    assert classifier_free_guidance(cond, uncond, 1.0) is cond
    out = classifier_free_guidance(cond, uncond, 4.0)
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(out[:, 4:], cond[:, 4:])
    with pytest.raises(ValueError):
        classifier_free_guidance(cond, uncond[:1], 4.0)
    with pytest.raises(ValueError):
        classifier_free_guidance(cond[:, :7], uncond[:, :7], 4.0)


def test_make_sampler():
    assert DEFAULT_STEPS == {"iddpm": 100, "ddim": 25, "dpm++2m": 10}
    assert isinstance(make_sampler("dpm++2m", 6), DPMSolverPP2MSampler)
    a = make_sampler("iddpm", 50)
    b = make_sampler("ddim", DEFAULT_STEPS["ddim"])
    assert isinstance(a, IDDPMSampler) and isinstance(a, Sampler) and a.num_steps == 50
    assert isinstance(b, DDIMSampler) and b.num_steps == 25 and b.eta == 0.0
    assert IDDPMSampler().num_steps == 100 and DDIMSampler().num_steps == 25
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", 10)
    with pytest.raises(ValueError):
        make_sampler("ddim", 0)


def test_bad_inputs_raise():
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            IDDPMSampler(bad)
    for eta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eta"):
            DDIMSampler(10, eta=eta)
    s = IDDPMSampler(10)
    x = torch.zeros(2, *SHAPE)
    mo = torch.zeros(2, 2 * SHAPE[0], *SHAPE[1:])
    k = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="noise"):
        s.step(x, mo, k)
    with pytest.raises(ValueError, match="noise"):
        s.step(x, mo, k, torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="model_out"):
        s.step(x, mo[:, : SHAPE[0]], k, x)
    with pytest.raises(ValueError, match="k must"):
        s.step(x, mo, torch.tensor([1, 2, 3]), x)
    with pytest.raises(ValueError, match="k must"):
        s.step(x, mo, torch.tensor([1.0, 2.0]), x)
    with pytest.raises(ValueError, match="k must"):
        s.step(x, mo, 10, x)
    with pytest.raises(ValueError, match="noise"):
        s.q_sample(x, k, torch.zeros(3, *SHAPE))
    with pytest.raises(ValueError):
        linear_betas(0)


@pytest.mark.parametrize("cls", [IDDPMSampler, DDIMSampler])
def test_clip_x0_steps_from_the_clamped_estimate(cls):
    gen = torch.Generator().manual_seed(7)
    plain, clipped = cls(num_steps=10), cls(num_steps=10, clip_x0=True)
    x_t = torch.randn(3, 2, 4, 4, generator=gen)
    out = torch.randn(3, 4, 4, 4, generator=gen)
    noise = torch.randn(3, 2, 4, 4, generator=gen)
    k = torch.tensor([9, 4, 0])
    signal, sigma = (clipped._q_table[:, k].view(2, 3, 1, 1, 1)).unbind(0)
    x0 = (x_t - sigma * out[:, :2]) / signal
    assert x0.abs().max() > 1  # the case the clamp exists for
    eps_clamped = (x_t - signal * x0.clamp(-1, 1)) / sigma
    expected = plain.step(x_t, torch.cat([eps_clamped, out[:, 2:]], 1), k, noise)
    got = clipped.step(x_t, out, k, noise)
    assert torch.allclose(got, expected, atol=1e-5)
    assert got[2].abs().max() <= 1 + 1e-5  # the last step returns the clamped x0 itself
    # an estimate already inside [-1, 1] is left alone
    inside = (x_t - signal * torch.rand(3, 2, 4, 4, generator=gen).mul(1.8).sub(0.9)) / sigma
    full = torch.cat([inside, out[:, 2:]], 1)
    assert torch.allclose(clipped.step(x_t, full, k, noise), plain.step(x_t, full, k, noise), atol=1e-5)


def test_pipelines_clip_only_pixel_models():
    from ca2vdm.server.model.loader import load_pipeline

    assert load_pipeline("random:tiny", device="cpu").sampler("ddim", 5).clip_x0
    assert not make_sampler("ddim", 5).clip_x0


def test_pixel_models_default_to_fp32_on_gpus():
    from ca2vdm.server.model.config import get_preset
    from ca2vdm.server.model.loader import default_dtype

    cuda = torch.device("cuda")
    assert default_dtype(cuda, get_preset("small")) == torch.float32
    assert default_dtype(cuda, get_preset("XL/2")) == torch.bfloat16
    assert default_dtype(torch.device("cpu"), get_preset("XL/2")) == torch.float32


# ---------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ---------------------------------------------------------------------------------------------------------


def _ref_dpmpp2m(x, eps, x0_prev, k: int, used: list[int]) -> torch.Tensor:
    """One DPM-Solver++(2M) step for a single element in float64, from the log-SNR form of Lu et al. (2022)."""

    def coefs(i: int) -> tuple[float, float, float]:
        ab = ALPHA_BARS[used[i]]
        alpha, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
        return alpha, sigma, math.log(alpha / sigma)

    a_s, s_s, lam_s = coefs(k)
    x0 = (x - s_s * eps) / a_s
    if k == 0:  # into t = 0: the data estimate itself
        return x0
    a_t, s_t, lam_t = coefs(k - 1)
    h = lam_t - lam_s
    if k == len(used) - 1 or k == 1:  # no previous estimate, or the step into t = 0: first order
        d = x0
    else:
        r = (lam_s - coefs(k + 1)[2]) / h
        d = (1.0 + 1.0 / (2.0 * r)) * x0 - x0_prev / (2.0 * r)
    return (s_t / s_s) * x - a_t * math.expm1(-h) * d


def _log_snr_spacing(n: int) -> list[int]:
    """n timesteps evenly spaced in lambda = log(sqrt(ab / (1 - ab))), each the nearest integer timestep."""
    lam = [0.5 * math.log(ab / (1.0 - ab)) for ab in ALPHA_BARS]
    picked: list[int] = []
    for i in range(n):
        target = lam[0] + (lam[-1] - lam[0]) * i / (n - 1)
        t = min(range(T_TRAIN), key=lambda j: abs(lam[j] - target))
        picked.append(t if not picked or t > picked[-1] else picked[-1] + 1)
    return picked


def test_dpmpp2m_chain_is_evenly_spaced_in_log_snr():
    for n in (2, 4, 10, 25):
        assert DPMSolverPP2MSampler(n).timesteps.tolist() == _log_snr_spacing(n)
    assert DPMSolverPP2MSampler(10).timesteps.tolist() == [0, 5, 22, 73, 202, 410, 603, 757, 886, 999]
    assert DPMSolverPP2MSampler(1).timesteps.tolist() == [0]
    # the prefix perturbation goes to the chain's timestep nearest t_p (73 for 100 at 10 steps), none near 0
    s = DPMSolverPP2MSampler(10)
    assert s.perturb_index(100) == 3 and s.perturb_index(1) is None and s.perturb_index(0) is None


@pytest.mark.parametrize("n", [2, 7, 25])
def test_dpmpp2m_step_matches_oracle(n):
    s = DPMSolverPP2MSampler(n)
    used = _log_snr_spacing(n)
    for batch, ks in enumerate(_index_batches(n, seed=n)):
        x, model_out, _ = _random_inputs(ks, seed=100 + batch)
        x0_prev = torch.randn(x.shape, generator=torch.Generator().manual_seed(batch))
        got = s.step(x, model_out, ks, x0_prev=x0_prev)
        eps = model_out[:, : SHAPE[0]].double()
        want = torch.stack([_ref_dpmpp2m(x[i].double(), eps[i], x0_prev[i].double(), int(k), used)
                            for i, k in enumerate(ks)])  # fmt: skip
        assert _rel_err(got, want) < 1e-5


def test_dpmpp2m_batches_elements_at_different_indices_and_needs_the_previous_estimate():
    s = DPMSolverPP2MSampler(10)
    ks = torch.tensor([9, 0, 1, 4, 4, 2])  # first, last, and second-order indices
    x, model_out, _ = _random_inputs(ks, seed=3)
    prev = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    batched = s.step(x, model_out, ks, x0_prev=prev)
    single = torch.cat([s.step(x[i : i + 1], model_out[i : i + 1], ks[i : i + 1], x0_prev=prev[i : i + 1])
                        for i in range(6)])  # fmt: skip
    torch.testing.assert_close(batched, single)
    # the first index (9) and the last two (1, 0) ignore the previous estimate; the others read it
    other = s.step(x, model_out, ks, x0_prev=prev + 1)
    assert torch.equal(other[:3], batched[:3])
    assert all(not torch.allclose(other[i], batched[i]) for i in range(3, 6))
    with pytest.raises(ValueError, match="x0_prev"):
        s.step(x, model_out, ks)
    # predict_x0 is the estimate the step used
    x0 = s.predict_x0(x, model_out, ks)
    torch.testing.assert_close(s.step(x, model_out, torch.zeros(6, dtype=torch.long), x0_prev=prev),
                               s.predict_x0(x, model_out, 0))  # fmt: skip
    assert x0.shape == x.shape
    with pytest.raises(ValueError, match="x0_prev"):
        s.step(x, model_out, ks, x0_prev=prev[:2])


def _gaussian_eps(mu: float, std: float, used_alpha_bar: dict[int, float]):
    """The exact epsilon of data N(mu, std^2) at every timestep: the ODE has a closed-form solution."""

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = torch.tensor([used_alpha_bar[int(v)] for v in t], dtype=torch.float64).view(-1, 1, 1, 1, 1)
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
        eps = sigma * (x.double() - alpha * mu) / (alpha**2 * std**2 + sigma**2)
        return torch.cat([eps, torch.zeros_like(eps)], 1).float()

    return model_fn


def test_dpmpp2m_solves_the_ode_more_accurately_than_ddim_in_few_steps():
    """Data N(mu, std^2): the probability-flow ODE maps x_T to mu + std (x_T - alpha_T mu) / sqrt(alpha_T^2 std^2 +
    sigma_T^2). The second-order solver gets much closer to it than DDIM with the same 4-10 model calls."""
    mu, std = 0.3, 0.5
    x_T = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    ab_T = ALPHA_BARS[T_TRAIN - 1]
    exact = mu + std * (x_T.double() - math.sqrt(ab_T) * mu) / math.sqrt(ab_T * std**2 + 1 - ab_T)
    fn = _gaussian_eps(mu, std, {t: ALPHA_BARS[t] for t in range(T_TRAIN)})
    for n, bound in ((6, 0.15), (8, 0.03), (10, 0.015)):
        err_dpm = _rel_err(DPMSolverPP2MSampler(n).sample_loop(fn, x_T), exact)
        err_ddim = _rel_err(DDIMSampler(n).sample_loop(fn, x_T), exact)
        assert err_dpm < bound and err_dpm < err_ddim / 2, (n, err_dpm, err_ddim)
