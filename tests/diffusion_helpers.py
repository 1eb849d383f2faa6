"""A closed-form denoiser for data x_0 ~ N(mu, sigma²) per dimension, whose exact x_0-prediction is known."""

import torch

from unclip.diffusion import GaussianDiffusion


class GaussianDenoiser:
    """E[x_0 | x_t] = mu + a·σ²/(a²σ² + b²) · (x_t - a·mu), with a = sqrt(ᾱ_t), b² = 1 - ᾱ_t.

    Outputs the diffusion's prediction type, so it is the exact optimum of its training loss.
    """

    def __init__(self, diffusion: GaussianDiffusion, mu: torch.Tensor, sigma: torch.Tensor):
        self.diffusion, self.mu, self.sigma = diffusion, mu.double(), sigma.double()
        self.calls, self.rows = 0, 0

    def x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ac = self.diffusion.alphas_cumprod[t].reshape(-1, 1)
        a, b2 = ac.sqrt(), 1 - ac
        x = x_t.double()
        return (self.mu + a * self.sigma**2 / (a**2 * self.sigma**2 + b2) * (x - a * self.mu)).to(x_t.dtype)

    def __call__(self, x_t, t, **cond):
        self.calls += 1
        self.rows += x_t.shape[0]
        x0 = self.x0(x_t, t)
        if self.diffusion.prediction == "x0":
            return x0
        eps = self.diffusion.eps_from_x0(x_t, t, x0)
        if self.diffusion.prediction == "eps":
            return eps
        return self.diffusion.v_from(x0, eps, t)

    def exact_ode_solution(self, x_T: torch.Tensor, t_start: int) -> torch.Tensor:
        """The probability-flow ODE maps x_t to x_0 = mu + σ·z with z = (x_t - a·mu)/sqrt(a²σ² + b²)."""
        ac = self.diffusion.alphas_cumprod[t_start]
        a, b2 = ac.sqrt(), 1 - ac
        z = (x_T.double() - a * self.mu) / (a**2 * self.sigma**2 + b2).sqrt()
        return (self.mu + self.sigma * z).float()


def make_problem(dims: int = 8, prediction: str = "eps", schedule: str = "cosine"):
    from unclip.config import DiffusionConfig

    diffusion = GaussianDiffusion.from_config(DiffusionConfig(schedule=schedule, prediction=prediction))
    gen = torch.Generator().manual_seed(1234)
    mu = torch.rand(dims, generator=gen) * 1.0 + 0.5  # in [0.5, 1.5]
    sigma = torch.rand(dims, generator=gen) * 0.4 + 0.2  # in [0.2, 0.6]
    return diffusion, GaussianDenoiser(diffusion, mu, sigma)
