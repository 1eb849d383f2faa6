"""Networks: each is a function `model(x_t, t, **cond) -> prediction` and imports nothing from diffusion/.

`layers` holds the blocks they share; `prior` the PriorTransformer; `unet` the decoder UNet; `inpaint` and
`upsampler` its thin subclasses, InpaintUNet and UpsamplerUNet.
"""
