"""Training losses of Ca2-VDM: the 1000-step linear-beta forward process, L_simple (epsilon MSE) and L_vlb with
learned-range variance (IDDPM), masked to the target frames.

Per-frame timesteps: x and t are (B, C, T, H, W) and (B, T); conditional frames carry t = 0 and no loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ca2vdm.server.model.diffusion import linear_betas


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) for data in [-1, 1] quantised to 256 levels under N(mean, exp(log_scale)^2), per element."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class TrainingDiffusion:
    """Coefficient tables (float64 → float32) of the forward process and the true posterior q(x_{t-1} | x_t, x_0)."""

    def __init__(self, num_steps: int = 1000, device: torch.device | str = "cpu") -> None:
        betas = linear_betas(num_steps)
        acp = torch.cumprod(1.0 - betas, 0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        tables = {
            "sqrt_acp": acp.sqrt(),
            "sqrt_1m_acp": (1.0 - acp).sqrt(),
            "sqrt_recip_acp": (1.0 / acp).sqrt(),
            "sqrt_recipm1_acp": (1.0 / acp - 1.0).sqrt(),
            "log_beta": betas.log(),
            "post_log_var": torch.cat([post_var[1:2], post_var[1:]]).log(),  # clipped: var at t=0 is 0
            "post_c0": betas * acp_prev.sqrt() / (1.0 - acp),
            "post_ct": (1.0 - acp_prev) * (1.0 - betas).sqrt() / (1.0 - acp),
        }
        self.num_steps = num_steps
        self.t = {k: v.float().to(device) for k, v in tables.items()}

    def _at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Table values at per-frame t (B, T), shaped (B, 1, T, 1, 1) to broadcast over (B, C, T, H, W)."""
        return self.t[name][t][:, None, :, None, None].to(like.dtype)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self._at("sqrt_acp", t, x0) * x0 + self._at("sqrt_1m_acp", t, x0) * noise

    def losses(self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor, mask: Tensor) -> dict:
        """L_simple + L_vlb (bits/dim), averaged over the elements where `mask` (B, 1, T, 1, 1) is 1.

        The variance term sees the epsilon prediction detached, as in IDDPM, so it trains only the variance.
        """
        c = x0.shape[1]
        eps, v = model_out.float().split(c, dim=1)
        x0f, x_tf = x0.float(), x_t.float()
        mse = (eps - noise.float()).pow(2)
        # true posterior and the model's, with the predicted x0 from the detached epsilon
        true_mean = self._at("post_c0", t, x0f) * x0f + self._at("post_ct", t, x0f) * x_tf
        true_log_var = self._at("post_log_var", t, x0f)
        pred_x0 = self._at("sqrt_recip_acp", t, x0f) * x_tf - self._at("sqrt_recipm1_acp", t, x0f) * eps.detach()
        model_mean = self._at("post_c0", t, x0f) * pred_x0 + self._at("post_ct", t, x0f) * x_tf
        frac = (v + 1) / 2
        model_log_var = frac * self._at("log_beta", t, x0f) + (1 - frac) * true_log_var
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                    + (true_mean - model_mean).pow(2) * torch.exp(-model_log_var)) / math.log(2.0)  # fmt: skip
        nll = -discretized_gaussian_log_likelihood(x0f, model_mean, 0.5 * model_log_var) / math.log(2.0)
        vb = torch.where((t == 0)[:, None, :, None, None], nll, kl)
        weight = mask.expand_as(mse).float()
        denom = weight.sum().clamp(min=1.0)
        out = {"mse": (mse * weight).sum() / denom, "vb": (vb * weight).sum() / denom}
        out["loss"] = out["mse"] + out["vb"]
        return out
