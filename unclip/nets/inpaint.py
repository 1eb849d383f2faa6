"""The unCLIP inpainting decoder: GLIDE's `InpaintText2ImUNet` (Nichol et al. 2021) as a thin subclass of the
decoder `UNet`, whose extra input channels are the known part of the image and the mask. Written for this project
(MIT licence).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor

from unclip.nets.unet import UNet, UNetConfig


class InpaintUNet(UNet):
    """GLIDE's inpainting decoder: the known part of the image and the mask are extra input channels.

    config.extra_in_channels must be in_channels + 1. Fine-tune it from a trained decoder with `from_unet`.
    """

    def __init__(self, config: UNetConfig):
        if config.extra_in_channels != config.in_channels + 1:
            raise ValueError(
                f"InpaintUNet needs model.extra_in_channels = in_channels + 1 = {config.in_channels + 1} "
                f"(the masked image and the mask), got {config.extra_in_channels}"
            )
        super().__init__(config)

    def forward(self, x_t: Tensor, t: Tensor, *, inpaint_image: Tensor, inpaint_mask: Tensor, **cond) -> Tensor:
        """Predict as UNet.forward, seeing the image outside the mask.

        Args:
            x_t: (B, in_channels, H, W) noised images.
            inpaint_image: (B, in_channels, H, W) the image to edit, in [-1, 1].
            inpaint_mask: (B, 1, H, W), 1 = repaint (white in the user's mask), 0 = keep.
            **cond: image_embed, text_tokens, text_mask, cond_drop as for UNet.forward.
        """
        self._check_input(x_t, self.config.in_channels)
        B, _, H, W = x_t.shape
        if inpaint_image.shape != x_t.shape:
            raise ValueError(
                f"inpaint_image must have x_t's shape {tuple(x_t.shape)}, got {tuple(inpaint_image.shape)}"
            )
        if inpaint_mask.shape != (B, 1, H, W):
            raise ValueError(f"inpaint_mask must have shape ({B}, 1, {H}, {W}), got {tuple(inpaint_mask.shape)}")
        mask = inpaint_mask.to(x_t.dtype)
        x = torch.cat([x_t, inpaint_image * (1 - mask), mask], dim=1)  # (B, 2 * in_channels + 1, H, W)
        return super().forward(x, t, **cond)

    @classmethod
    def from_unet(cls, unet: UNet, **changes) -> InpaintUNet:
        """An InpaintUNet that starts from a trained decoder, whatever the masked image (see from_state_dict)."""
        return cls.from_state_dict(unet.state_dict(), unet.config, **changes)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor], config: UNetConfig, **changes) -> InpaintUNet:
        """Build an InpaintUNet from a plain decoder's weights.

        Every tensor is copied; the first conv gets zero weights for the new input channels, so at the start of
        fine-tuning the model's output equals the decoder's for any masked image and mask.

        Args:
            state_dict: a `UNet` state dict, e.g. `load_model(path).model.state_dict()`.
            config: that UNet's config (extra_in_channels 0).
            **changes: config fields that do not change the weights' shapes, e.g. gradient_checkpointing=True,
                cond_drop_text=0.2.
        """
        if config.extra_in_channels:
            raise ValueError(
                f"from_state_dict expects a plain decoder config, got extra_in_channels={config.extra_in_channels}"
            )
        config = dataclasses.replace(config, **changes, extra_in_channels=config.in_channels + 1)
        model = cls(config)
        state = dict(state_dict)
        weight = state["input_conv.weight"]  # (C, in_channels, 3, 3)
        extra = weight.new_zeros(weight.shape[0], config.extra_in_channels, *weight.shape[2:])
        state["input_conv.weight"] = torch.cat([weight, extra], dim=1)
        model.load_state_dict(state)
        return model
