"""Networks: each is a function `model(x_t, t, **cond) -> prediction` and imports nothing from diffusion/."""
