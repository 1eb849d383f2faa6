"""Choose the timesteps a fast sampler visits.

Every sampler walks a decreasing list of training timesteps t_0 > t_1 > ... > t_{n-1} and, after the last
one, lands on the clean sample (ᾱ = 1). The spacings follow the names in common use (Lin et al. 2023,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2):

    trailing   round(T, T - T/n, ..., T/n) - 1       starts at T-1 (the default: it starts from pure noise)
    leading    (n-1)·⌊T/n⌋, ..., ⌊T/n⌋, 0            DDIM's original spacing; misses the noisiest steps
    linspace   round(linspace(0, T-1, n+1))[::-1][:-1]   diffusers' DPMSolverMultistepScheduler default
    unclip     round(linspace(0, T-1, n))[::-1]         both ends: diffusers' UnCLIPScheduler (Karlo, Kandinsky)
"""

from __future__ import annotations

import numpy as np

SPACINGS = ("trailing", "leading", "linspace", "unclip")


def respace_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """The `steps` training timesteps a sampler visits, in decreasing order.

    Args:
        num_timesteps: T, the number of training timesteps.
        steps: how many model evaluations the sampler makes, 1 <= steps <= T.
        spacing: "trailing" (default), "leading", "linspace" or "unclip".

    Returns:
        a list of `steps` distinct ints in [0, T), decreasing.
    """
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and the {num_timesteps} training timesteps, got {steps}")
    T = num_timesteps
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(steps) * (T // steps))[::-1]
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps + 1).round().astype(np.int64)[::-1][:-1]
    elif spacing == "unclip":
        ts = np.round(np.arange(steps) * ((T - 1) / max(steps - 1, 1)))[::-1].astype(np.int64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid spacings: {list(SPACINGS)}")
    ts = [int(t) for t in ts[:steps]]
    if len(set(ts)) != len(ts):  # only reachable for steps close to T with rounding
        raise ValueError(f"{spacing!r} spacing gives repeated timesteps for {steps} of {T} steps")
    return ts
