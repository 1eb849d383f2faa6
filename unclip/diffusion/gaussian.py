"""Gaussian diffusion: the forward process, prediction targets, posteriors and the training loss.

Started from the equations of Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (IDDPM: cosine schedule, learned
"range" variance and the hybrid loss), Salimans & Ho 2022 (v-prediction) and Hang et al. 2023 (Min-SNR-γ
weighting). Tables are kept in float64 and cast per call; all loss terms are computed in float32, so a model
run under fp16 autocast still gives finite losses.

The network is an argument, never an attribute: `training_loss(model, x_0, cond=...)` calls
`model(x_t, t, **cond)`, as guided-diffusion's `training_losses` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from unclip.config import DiffusionConfig
from unclip.diffusion.respace import SPACINGS
from unclip.diffusion.schedules import alphas_cumprod_from_betas, make_betas

PREDICTIONS = ("eps", "x0", "v")


class GaussianDiffusion:
    """The diffusion process of one model: q(x_t | x_0) and what its network predicts.

    Args:
        betas: (T,) noise schedule.
        prediction: what the network outputs: "eps" (noise), "x0" (clean sample) or "v" (velocity).
        learned_variance: the network also outputs IDDPM's variance interpolation values
            (its output then has twice the channels of x_t, prediction first).
        vlb_weight: λ of IDDPM's hybrid loss L_simple + λ·L_vlb (with learned variance only).
        min_snr_gamma: if set, weight the MSE by Min-SNR-γ (Hang et al. 2023, eq. 7-9).
        spacing: the timesteps the samplers visit unless told otherwise (unclip.diffusion.respace).
        clamp_variance: keep the learned variance between β̃_t and β_t (IDDPM's interpolation weight clamped to
            [0, 1]) when sampling; False interpolates beyond them as guided-diffusion (and so Karlo) does.
    """

    def __init__(
        self,
        betas: Tensor,
        *,
        prediction: str = "eps",
        learned_variance: bool = False,
        vlb_weight: float = 0.001,
        min_snr_gamma: float | None = None,
        spacing: str = "trailing",
        clamp_variance: bool = True,
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; valid: {list(PREDICTIONS)}")
        self.betas = betas.double()
        self.num_timesteps = len(betas)
        self.prediction = prediction
        self.learned_variance = learned_variance
        self.vlb_weight = vlb_weight
        self.min_snr_gamma = min_snr_gamma
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; valid spacings: {list(SPACINGS)}")
        self.spacing = spacing
        self.clamp_variance = clamp_variance

        self._on_device: dict[tuple[str, torch.device], Tensor] = {}
        ac = alphas_cumprod_from_betas(self.betas)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.alphas_cumprod = ac
        self.alphas_cumprod_prev = ac_prev
        # q(x_{t-1} | x_t, x_0), Ho et al. eq. 6-7
        self.posterior_variance = self.betas * (1 - ac_prev) / (1 - ac)
        # the variance is 0 at t=0; IDDPM clips the log to the value at t=1
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = self.betas * ac_prev.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - ac_prev) * (1 - self.betas).sqrt() / (1 - ac)

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> GaussianDiffusion:
        return cls(
            make_betas(config.schedule, config.timesteps, config.betas),
            prediction=config.prediction,
            learned_variance=config.learned_variance,
            vlb_weight=config.vlb_weight,
            min_snr_gamma=config.min_snr_gamma,
        )

    # -- tables ------------------------------------------------------------------------------------

    def alpha_bar(self, t: Tensor, x: Tensor) -> Tensor:
        """ᾱ_t gathered for a batch of integer timesteps, shaped to broadcast against x."""
        return self._gather("alphas_cumprod", t, x)

    def snr(self, t: Tensor) -> Tensor:
        ac = self._table("alphas_cumprod", t.device)[t]
        return (ac / (1 - ac)).float()

    def _table(self, name: str, device: torch.device) -> Tensor:
        """A float64 table on `device`, copied there once (a copy per call would synchronise a GPU each step)."""
        key = (name, device)
        if key not in self._on_device:
            table = torch.log(self.betas) if name == "log_betas" else getattr(self, name)
            self._on_device[key] = table.to(device)
        return self._on_device[key]

    def _gather(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """table[t] as x's dtype (float32 for half inputs) on x's device, shaped (B, 1, ..., 1)."""
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        values = self._table(name, t.device)[t].to(device=x.device, dtype=dtype)
        return values.reshape(-1, *([1] * (x.ndim - 1)))

    # -- forward process -----------------------------------------------------------------------------

    def q_sample(self, x_0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Diffuse x_0 to step t: sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·eps  (Ho et al. 2020, eq. 4).

        Args:
            x_0: clean samples, (B, ...), in [-1, 1] for images.
            t: integer timesteps, (B,).
            noise: eps ~ N(0, I), same shape as x_0; drawn if None.

        Returns:
            x_t, same shape as x_0.
        """
        if noise is None:
            noise = torch.randn_like(x_0)
        if noise.shape != x_0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match x_0 shape {tuple(x_0.shape)}")
        ac = self.alpha_bar(t, x_0)
        return ac.sqrt() * x_0 + (1 - ac).sqrt() * noise

    # -- conversions between prediction targets (all at the same x_t, t) ---------------------------

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        ac = self.alpha_bar(t, x_t)
        return (x_t - (1 - ac).sqrt() * eps) / ac.sqrt()

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x_0: Tensor) -> Tensor:
        ac = self.alpha_bar(t, x_t)
        return (x_t - ac.sqrt() * x_0) / (1 - ac).sqrt()

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """v = sqrt(ᾱ)·eps - sqrt(1-ᾱ)·x_0  =>  x_0 = sqrt(ᾱ)·x_t - sqrt(1-ᾱ)·v  (Salimans & Ho 2022, §4)."""
        ac = self.alpha_bar(t, x_t)
        return ac.sqrt() * x_t - (1 - ac).sqrt() * v

    def v_from(self, x_0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        ac = self.alpha_bar(t, x_0)
        return ac.sqrt() * eps - (1 - ac).sqrt() * x_0

    def predict_x0(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> Tensor:
        """The clean sample implied by the network's prediction (of type self.prediction)."""
        if self.prediction == "eps":
            return self.x0_from_eps(x_t, t, prediction)
        if self.prediction == "v":
            return self.x0_from_v(x_t, t, prediction)
        return prediction

    def target(self, x_0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network is trained to output for (x_0, eps, t)."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "v":
            return self.v_from(x_0, eps, t)
        return x_0

    def split_output(self, out: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(prediction, variance values or None) from a network output."""
        if not self.learned_variance:
            if out.shape != x_t.shape:
                raise ValueError(f"model output {tuple(out.shape)} does not match x_t {tuple(x_t.shape)}")
            return out, None
        channels = x_t.shape[1]
        if out.shape[1] != 2 * channels:
            raise ValueError(
                f"a learned-variance model must output {2 * channels} channels (prediction + variance), "
                f"got {out.shape[1]}; set the network's learned_variance to match the diffusion config"
            )
        return out[:, :channels], out[:, channels:]

    # -- posteriors ----------------------------------------------------------------------------------

    def q_posterior(self, x_0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)  (Ho et al. eq. 6-7)."""
        mean = self._gather("posterior_mean_coef1", t, x_t) * x_0 + self._gather("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._gather("posterior_log_variance_clipped", t, x_t)

    def learned_log_variance(self, var_values: Tensor, t: Tensor, x_t: Tensor) -> Tensor:
        """IDDPM eq. 15: log Σ = v·log β_t + (1-v)·log β̃_t, with v = (out+1)/2 clamped to [0, 1]."""
        frac = ((var_values.float() + 1) / 2).clamp(0, 1)
        min_log = self._gather("posterior_log_variance_clipped", t, x_t).float()
        max_log = self._gather("log_betas", t, x_t).float()
        return frac * max_log + (1 - frac) * min_log

    # -- training ------------------------------------------------------------------------------------

    def training_loss(
        self,
        model: Callable[..., Tensor],
        x_0: Tensor,
        *,
        cond: dict[str, Any] | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The loss for one batch: MSE on the prediction target (+ λ·VLB with learned variance).

        Args:
            model: the network, called as model(x_t, t, **cond).
            x_0: clean samples, (B, ...).
            cond: conditioning keyword arguments for the network.
            t: timesteps (B,); uniform over [0, T) if None.
            noise: eps (B, ...); standard normal if None.

        Returns:
            {"loss": (B,), "mse": (B,)} and, with learned variance, "vlb": (B,), all float32; and the network's
            "prediction" of the target (B, ...), in its own dtype.
        """
        B = x_0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), device=x_0.device)
        if noise is None:
            noise = torch.randn_like(x_0)
        x_t = self.q_sample(x_0, t, noise)
        out = model(x_t, t, **(cond or {}))
        prediction, var_values = self.split_output(out, x_t)
        target = self.target(x_0, noise, t)
        mse = _mean_flat((prediction.float() - target.float()) ** 2)
        if self.min_snr_gamma is not None:
            mse = mse * self.min_snr_weight(t)
        terms = {"mse": mse, "loss": mse, "prediction": prediction}
        if var_values is not None:
            # the VLB trains only the variance: the mean is taken from a frozen copy of the prediction
            vlb = self.vlb_term(prediction.detach(), var_values, x_0, x_t, t)
            terms["vlb"] = vlb
            terms["loss"] = mse + self.vlb_weight * self.num_timesteps * vlb
        return terms

    def min_snr_weight(self, t: Tensor) -> Tensor:
        """Min-SNR-γ loss weight for the prediction type, so that all equal min(SNR, γ) on the x_0 scale."""
        snr = self.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction == "eps":
            return clipped / snr
        if self.prediction == "v":
            return clipped / (snr + 1)
        return clipped

    def vlb_term(self, prediction: Tensor, var_values: Tensor, x_0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """L_t of the variational bound in bits per dimension: KL(q || p_θ) for t > 0, the discretised
        Gaussian decoder NLL for t = 0 (Ho et al. §3.3; for data in [-1, 1] quantised to 8 bits)."""
        x_0, x_t = x_0.float(), x_t.float()
        true_mean, true_log_var = self.q_posterior(x_0, x_t, t)
        x0_pred = self.predict_x0(x_t, t, prediction.float())
        model_mean, _ = self.q_posterior(x0_pred, x_t, t)
        model_log_var = self.learned_log_variance(var_values, t, x_t)
        kl = _mean_flat(normal_kl(true_mean.float(), true_log_var.float(), model_mean, model_log_var)) / math.log(2)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x_0, model_mean, 0.5 * model_log_var)) / math.log(2)
        return torch.where(t == 0, nll, kl)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) for x in [-1, 1] quantised to 256 bins, under N(mean, e^(2·log_scale)) (Ho et al. eq. 13)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_minus = _approx_std_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_minus).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))),
    )
    return log_probs


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _mean_flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)
