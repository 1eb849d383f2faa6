"""Layers shared by the networks: timestep embeddings, normalisation, and the residual and attention blocks.

The Transformer block is GPT-2's pre-LN block (Radford et al. 2019), used by the prior and by the decoder's text
layers. The convolutional blocks are ADM's (Dhariwal & Nichol 2021): a ResBlock modulated by the conditioning
embedding, resampling layers, and self-attention over the pixels with GLIDE's extra context tokens. Attention
runs through PyTorch's `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer and ADM.

    Args:
        t: timesteps, (B,), integer or float.
        dim: embedding width.

    Returns:
        (B, dim) float32 embedding: [cos(t·f_i), sin(t·f_i)] with geometric frequencies f_i.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int, max_groups: int = 32, min_group_channels: int = 4) -> nn.GroupNorm:
    """GroupNorm with 32 groups (ADM), fewer for narrow layers so that each group keeps >= 4 channels.

    The group count is the largest divisor of `channels` that is at most `max_groups` and leaves at least
    `min_group_channels` channels per group (1 group for layers narrower than that).
    """
    groups = max(
        (g for g in range(1, max_groups + 1) if channels % g == 0 and channels // g >= min_group_channels),
        default=1,
    )
    return nn.GroupNorm(groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so that a residual branch starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SelfAttention(nn.Module):
    """Multi-head self-attention over a (B, S, C) sequence; `mask` is a boolean SDPA mask, True = attend."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, S, C/H)
        dropout = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, S, C/H)
        return self.proj(h.transpose(1, 2).reshape(B, S, C))


class TransformerBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning embedding as a scale and shift of the second norm.

    With `resample` "down" or "up" the block also halves or doubles the resolution (BigGAN style), resampling
    both branches between the first norm and the first conv.
    """

    def __init__(
        self,
        channels: int,
        emb_dim: int,
        out_channels: int | None = None,
        *,
        dropout: float = 0.0,
        scale_shift: bool = True,
        resample: str | None = None,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.resample = resample
        self.scale_shift = scale_shift
        self.norm_in = group_norm(channels)
        self.conv_in = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels * (2 if scale_shift else 1))
        self.norm_out = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, C, H, W); emb: (B, E), already passed through SiLU by the U-Net."""
        h = F.silu(self.norm_in(x))
        if self.resample == "down":
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif self.resample == "up":
            h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
        h = self.conv_in(h)
        e = self.emb_proj(emb)[:, :, None, None]  # (B, 2C or C, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm_out(h), scale + 1)  # norm(h) * (1 + scale) + shift
        else:
            h = self.norm_out(h + e)
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve the resolution: a strided 3x3 conv, or 2x2 average pooling without a conv."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then a 3x3 conv if use_conv."""

    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0)
        return self.conv(x) if self.conv is not None else x


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels, with the context tokens as extra keys and values (GLIDE).

    q, k and v come from one fused projection; the context gets this layer's own key/value projection. The
    attention itself is `F.scaled_dot_product_attention`, which picks a fused kernel on CPU and GPU.
    """

    def __init__(self, channels: int, heads: int, context_dim: int | None = None, resolution: int | None = None):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        # a position embedding for a `resolution` x `resolution` feature map (resampled for other sizes)
        self.pos = nn.Parameter(torch.zeros(1, channels, resolution, resolution)) if resolution else None
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); context: (B, S, Dc) tokens; context_mask: (B, S) bool, True = attend."""
        B, C, H, W = x.shape
        d = C // self.heads
        h = self.norm(x)
        if self.pos is not None:
            pos = self.pos if self.pos.shape[-2:] == (H, W) else F.interpolate(self.pos, (H, W), mode="bilinear")
            h = h + pos.to(h.dtype)
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C); a view for channels_last inputs
        q, k, v = self.qkv(tokens).view(B, H * W, 3, self.heads, d).permute(2, 0, 3, 1, 4)  # 3 x (B, h, HW, d)
        mask = None
        if context is not None and self.context_kv is not None:
            S = context.shape[1]
            ck, cv = self.context_kv(context).view(B, S, 2, self.heads, d).permute(2, 0, 3, 1, 4)  # (B, h, S, d)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # (B, h, S + HW, d)
            if context_mask is not None:
                mask = torch.cat([context_mask, context_mask.new_ones(B, H * W)], dim=1)[:, None, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, HW, d)
        out = self.proj_out(out.transpose(1, 2).reshape(B, H * W, C))  # (B, HW, C)
        return x + out.transpose(1, 2).view(B, C, H, W)


class EmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: ResBlocks the embedding, attention the context."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return h
