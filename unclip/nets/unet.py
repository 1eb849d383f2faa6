"""The GLIDE-style U-Net decoder of unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation
with CLIP Latents", section 2.1).

The network is the ADM U-Net (Dhariwal & Nichol 2021): residual blocks whose GroupNorm is modulated by a scale
and shift from the conditioning embedding, self-attention at low resolutions, skip connections between the two
halves of the U, and zero-initialised residual branches. The conditioning follows the DALL·E 2 decoder, which
extends GLIDE (Nichol et al. 2021):

- the CLIP image embedding is added to the timestep embedding and projected into `num_image_tokens` context
  tokens;
- the per-token CLIP text encodings join those tokens as extra keys and values of every attention layer (each
  layer has its own key/value projection), and the pooled end-of-text feature is added to the timestep
  embedding, as in GLIDE;
- for classifier-free guidance the image and the text are dropped independently in training
  (`cond_drop_image`, `cond_drop_text`) and replaced by learned null embeddings.

Three options help the decoder read a caption's relations (which colour goes with which shape, what is above
what). Each is zero-initialised, so that a decoder trained without it can be fine-tuned with it from where it was:

- `text_layers`: a small Transformer of the decoder's own over the projected text tokens, trained with the
  diffusion loss as GLIDE's text encoder is;
- `text_words`: the caption's CLIP word embeddings (the input of CLIP's text transformer), projected and added
  to the projected encodings. CLIP's contrastive objective never needs "above" told from "below", and its text
  transformer maps such words to nearly the same final states; their input embeddings stay distinct;
- `attention_pos`: a learned position embedding per attention layer, added to the normalised pixels before
  their query/key/value projection. Attention over the pixels does not otherwise see where a pixel is, and a
  caption's "above" or "to the left of" is about position.

At a given size the U-Net is fastest with its parameters at low resolution, since a 3x3 conv costs its parameter
count times the feature-map area (Imagen's "Efficient U-Net", Saharia et al. 2022).

The blocks are in `unclip.nets.layers`; `InpaintUNet` and `UpsamplerUNet` are thin subclasses. Written from the
papers for this project (MIT licence); no code is taken from guided-diffusion or GLIDE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unclip.nets.layers import (
    AttentionBlock,
    Downsample,
    EmbedSequential,
    ResBlock,
    TransformerBlock,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_module,
)


@dataclass
class UNetConfig:
    image_size: int = 64  # training resolution; attention_resolutions are counted in pixels of this size
    in_channels: int = 3
    out_channels: int = 3
    learned_variance: bool = False  # output 2*out_channels: the prediction, then IDDPM's variance interpolation
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int | tuple[int, ...] = 2  # per level (low resolutions are cheap), or one count for all
    attention_resolutions: tuple[int, ...] = (16, 8)  # attention where the feature map is this many pixels wide
    num_heads: int | None = None  # a fixed number of heads; None = channels // head_channels
    head_channels: int = 64
    dropout: float = 0.0
    clip_dim: int | None = 768  # width D of the CLIP image embedding; None or 0 = not conditioned on it
    text_width: int | None = 768  # width W of the per-token CLIP text encodings; None or 0 = no text
    text_ctx: int = 77  # most text tokens accepted
    num_image_tokens: int = 4  # context tokens projected from the image embedding (DALL·E 2, section 2.1)
    cond_drop_image: float = 0.1  # training-time chance of replacing the image embedding by the null one
    cond_drop_text: float = 0.5  # training-time chance (independent) of dropping the text
    text_layers: int = 0  # bidirectional Transformer blocks over the projected text tokens (GLIDE's text encoder)
    attention_pos: bool = False  # a learned 2-D position embedding in each attention layer (zero-initialised)
    text_words: bool = False  # also read the caption's CLIP word embeddings, (B, L, text_width) (zero-initialised)
    gradient_checkpointing: bool = False
    channels_last: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True  # resample inside residual blocks (BigGAN style) instead of separate layers
    conv_resample: bool = True  # the separate layers: strided conv / nearest + conv, or bare avg-pool / nearest
    extra_in_channels: int = 0  # inputs concatenated to x_t: 4 for inpainting (masked image 3 + mask 1)

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.clip_dim = self.clip_dim or None
        self.text_width = self.text_width or None
        for name in ("image_size", "in_channels", "out_channels", "model_channels", "text_ctx"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"model.channel_mult must be a non-empty list of ints >= 1, got {self.channel_mult}")
        if not isinstance(self.num_res_blocks, int):
            self.num_res_blocks = tuple(self.num_res_blocks)
        if len(self.blocks_per_level) != len(self.channel_mult) or min(self.blocks_per_level) < 1:
            raise ValueError(
                f"model.num_res_blocks must be an int >= 1 or one per level of channel_mult {list(self.channel_mult)}"
                f", got {self.num_res_blocks}"
            )
        factor = self.downsample_factor
        if self.image_size % factor:
            raise ValueError(
                f"model.image_size {self.image_size} is not divisible by {factor} = 2**(len(channel_mult)-1) "
                f"for channel_mult {list(self.channel_mult)}"
            )
        resolutions = [self.image_size // 2**level for level in range(len(self.channel_mult))]
        unknown = sorted(set(self.attention_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(
                f"model.attention_resolutions {unknown} are not resolutions of this U-Net; "
                f"with image_size {self.image_size} and {len(self.channel_mult)} levels they are {resolutions}"
            )
        for res, mult in zip(resolutions, self.channel_mult, strict=True):
            if res in self.attention_resolutions or (res == resolutions[-1] and self.attention_resolutions):
                self.heads_for(self.model_channels * mult)
        for name in ("dropout", "cond_drop_image", "cond_drop_text"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"model.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.num_image_tokens < 0 or self.extra_in_channels < 0:
            raise ValueError("model.num_image_tokens and model.extra_in_channels must be >= 0")
        if self.text_width and not self.attention_resolutions:
            raise ValueError("model.text_width is set but attention_resolutions is empty: text needs attention")
        if self.text_layers < 0 or (self.text_layers and not self.text_width):
            raise ValueError(f"model.text_layers must be >= 0 and needs model.text_width, got {self.text_layers}")
        if self.text_words and not self.text_width:
            raise ValueError("model.text_words needs model.text_width (the word embeddings are that wide)")

    @property
    def blocks_per_level(self) -> tuple[int, ...]:
        """ResBlocks at each level of the encoder (the decoder has one more per level)."""
        if isinstance(self.num_res_blocks, int):
            return (self.num_res_blocks,) * len(self.channel_mult)
        return self.num_res_blocks

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def heads_for(self, channels: int) -> int:
        """The number of attention heads for a layer `channels` wide."""
        heads = self.num_heads or channels // self.head_channels
        if heads < 1 or channels % heads:
            raise ValueError(
                f"attention width {channels} does not split into heads (num_heads={self.num_heads}, "
                f"head_channels={self.head_channels}); choose num_heads dividing {channels}"
            )
        return heads


class UNet(nn.Module):
    """The unCLIP decoder: a conditional ADM U-Net, `model(x_t, t, **cond) -> prediction`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        c = config
        self.emb_dim = emb_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self._make_conditioning()
        self.input_conv = nn.Conv2d(c.in_channels + c.extra_in_channels, c.model_channels, 3, padding=1)
        skip_channels = self._make_down_blocks()
        ch = c.model_channels * c.channel_mult[-1]
        self.middle = EmbedSequential(
            self._res_block(ch),
            *self._attention(ch, c.image_size // c.downsample_factor, middle=True),
            self._res_block(ch),
        )
        self._make_up_blocks(skip_channels)
        ch, out_channels = c.model_channels * c.channel_mult[0], c.out_channels * (2 if c.learned_variance else 1)
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))
        if c.channels_last:
            self.to(memory_format=torch.channels_last)

    # -- construction -------------------------------------------------------------------------------------

    def _make_conditioning(self) -> None:
        c, emb_dim = self.config, self.emb_dim
        self.context_dim = None
        if c.clip_dim:
            self.null_image_embed = nn.Parameter(torch.randn(c.clip_dim))
            # LayerNorm first, so that the decoder does not care whether CLIP embeddings are L2-normalised
            self.image_norm = nn.LayerNorm(c.clip_dim)
            self.image_proj = nn.Linear(c.clip_dim, emb_dim)
            self.image_tokens = None
            if c.attention_resolutions and c.num_image_tokens:
                self.image_tokens = nn.Linear(c.clip_dim, c.num_image_tokens * emb_dim)
                self.context_dim = emb_dim
        if c.text_width:
            # a learned token always present in the context: it is what a dropped text row attends to
            self.null_text_token = nn.Parameter(torch.randn(1, 1, c.text_width))
            self.text_norm = nn.LayerNorm(c.text_width)
            self.text_proj = nn.Linear(c.text_width, emb_dim)
            self.text_pool_proj = nn.Linear(c.text_width, emb_dim)
            self.text_blocks = nn.ModuleList(self._text_block() for _ in range(c.text_layers))
            # positions made explicit for the text blocks (the null token is position 0); zero, like the blocks
            self.text_pos = nn.Parameter(torch.zeros(1, 1 + c.text_ctx, emb_dim)) if c.text_layers else None
            self.words_norm = self.words_proj = None
            if c.text_words:
                self.words_norm = nn.LayerNorm(c.text_width)
                self.words_proj = zero_module(nn.Linear(c.text_width, emb_dim))
            self.context_dim = emb_dim

    def _res_block(self, channels: int, out_channels: int | None = None, resample: str | None = None) -> ResBlock:
        c = self.config
        return ResBlock(
            channels,
            self.emb_dim,
            out_channels,
            dropout=c.dropout,
            scale_shift=c.use_scale_shift_norm,
            resample=resample,
        )

    def _text_block(self) -> TransformerBlock:
        """A pre-LN Transformer block over the text tokens whose residual branches start at zero, so that a
        decoder trained without text layers can be fine-tuned with them (train.init_from) from where it was."""
        block = TransformerBlock(self.emb_dim, self.config.heads_for(self.emb_dim), self.config.dropout)
        zero_module(block.attn.proj)
        zero_module(block.mlp[-1])
        return block

    def _attention(self, channels: int, resolution: int, middle: bool = False) -> list[nn.Module]:
        """An attention layer if this resolution has one (the middle block has one whenever any level does)."""
        c = self.config
        wanted = resolution in c.attention_resolutions or (middle and bool(c.attention_resolutions))
        if not wanted:
            return []
        return [
            AttentionBlock(channels, c.heads_for(channels), self.context_dim, resolution if c.attention_pos else None)
        ]

    def _make_down_blocks(self) -> list[int]:
        """Build the encoder half; return the channel count of every skip connection, in push order."""
        c = self.config
        self.down_blocks = nn.ModuleList()
        ch, resolution = c.model_channels, c.image_size
        skip_channels = [ch]
        for level, (mult, blocks) in enumerate(zip(c.channel_mult, c.blocks_per_level, strict=True)):
            for _ in range(blocks):
                out = c.model_channels * mult
                block = [self._res_block(ch, out), *self._attention(out, resolution)]
                ch = out
                self.down_blocks.append(EmbedSequential(*block))
                skip_channels.append(ch)
            if level < len(c.channel_mult) - 1:
                down = self._res_block(ch, resample="down") if c.resblock_updown else Downsample(ch, c.conv_resample)
                self.down_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)
                resolution //= 2
        return skip_channels

    def _make_up_blocks(self, skip_channels: list[int]) -> None:
        c = self.config
        self.up_blocks = nn.ModuleList()
        ch, resolution = c.model_channels * c.channel_mult[-1], c.image_size // c.downsample_factor
        for level, (mult, blocks) in reversed(list(enumerate(zip(c.channel_mult, c.blocks_per_level, strict=True)))):
            for i in range(blocks + 1):
                out = c.model_channels * mult
                block = [self._res_block(ch + skip_channels.pop(), out), *self._attention(out, resolution)]
                ch = out
                if level and i == blocks:
                    up = self._res_block(ch, resample="up") if c.resblock_updown else Upsample(ch, c.conv_resample)
                    block.append(up)
                    resolution *= 2
                self.up_blocks.append(EmbedSequential(*block))
        assert not skip_channels

    # -- forward ------------------------------------------------------------------------------------------

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        image_embed: Tensor | None = None,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        cond_drop: Tensor | None = None,
        text_words: Tensor | None = None,
    ) -> Tensor:
        """Predict from the noised image (eps, x_0 or v: the diffusion config decides which).

        Args:
            x_t: noised images, (B, in_channels + extra_in_channels, H, W); H and W multiples of
                2**(len(channel_mult)-1).
            t: timesteps, (B,) or a scalar, integer or float.
            image_embed: CLIP image embeddings, (B, clip_dim); required when clip_dim is set.
            text_tokens: per-token CLIP text encodings, (B, L, text_width) with L <= text_ctx; required when
                text_width is set.
            text_mask: (B, L) bool, True for real tokens; None means all are real.
            cond_drop: (B,) bool, True for a fully unconditional row (null image embedding and no text), or
                (B, 2) bool to drop the image embedding and the text separately (text guidance). None draws
                independent image and text drops in training mode, and drops nothing in eval mode.
                Conditioning may be omitted when every row is dropped.
            text_words: (B, L, text_width) the caption's CLIP word embeddings; required with text_words.

        Returns:
            (B, out_channels, H, W), or (B, 2 * out_channels, H, W) with learned_variance: the prediction, then
            the variance values v that the diffusion maps to the interpolation fraction (v + 1) / 2 (IDDPM, eq. 15).
        """
        self._check_input(x_t, self.config.in_channels + self.config.extra_in_channels)
        emb = self._embed_timestep(t, x_t.shape[0])
        return self._forward(x_t, emb, image_embed, text_tokens, text_mask, cond_drop, text_words)

    def _forward(self, x: Tensor, emb: Tensor, *cond: Tensor | None) -> Tensor:
        """Run on a checked input (extra channels included) and timestep embedding; cond as in forward."""
        emb, context, context_mask = self._condition(emb, *cond)
        h = x.to(emb.dtype)
        if self.config.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        return self._unet(h, F.silu(emb), context, context_mask).to(x.dtype)

    def _embed_timestep(self, t: Tensor, B: int) -> Tensor:
        """The timestep embedding (B, E); subclasses may add their own (the upsampler's noise level)."""
        t = t.expand(B) if t.ndim == 0 else t
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},) or be a scalar, got {tuple(t.shape)}")
        dtype = self.input_conv.weight.dtype
        return self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))

    def _unet(self, x: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        h = self.input_conv(x)
        skips = [h]
        for block in self.down_blocks:
            h = self._run_block(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._run_block(self.middle, h, emb, context, context_mask)
        for block in self.up_blocks:
            h = self._run_block(block, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)

    def _run_block(self, block: EmbedSequential, h: Tensor, *args) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, *args, use_reentrant=False)
        return block(h, *args)

    def _check_input(self, x: Tensor, channels: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{type(self).__name__} expects input (B, {channels}, H, W), got {tuple(x.shape)}")
        factor = self.config.downsample_factor
        H, W = x.shape[-2:]
        if H % factor or W % factor:
            near = [max(factor, round(n / factor) * factor) for n in (H, W)]
            raise ValueError(
                f"input size {H}x{W} is not divisible by {factor} = 2**(len(channel_mult)-1), the U-Net's "
                f"downsampling factor; use sizes that are multiples of {factor}, e.g. {near[0]}x{near[1]}"
            )

    # -- conditioning -------------------------------------------------------------------------------------

    def _condition(
        self,
        emb: Tensor,
        image_embed: Tensor | None,
        text_tokens: Tensor | None,
        text_mask: Tensor | None,
        cond_drop: Tensor | None,
        text_words: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Add the conditioning to emb and build the attention context: (emb, (B, S, E) tokens, (B, S) mask)."""
        c, B = self.config, emb.shape[0]
        drop_image, drop_text = self._drop_masks(cond_drop, B, emb.device)
        tokens, masks = [], []
        if c.clip_dim:
            image = self._image_or_null(image_embed, drop_image, B).to(emb.dtype)
            image = self.image_norm(image)
            emb = emb + self.image_proj(image)
            if self.image_tokens is not None:
                tokens.append(self.image_tokens(image).view(B, c.num_image_tokens, self.emb_dim))
                masks.append(drop_image.new_ones(B, c.num_image_tokens))
        elif image_embed is not None:
            raise ValueError("this UNet has clip_dim=None (no image conditioning) but was given image_embed")
        if c.text_width:
            text, text_valid, pooled = self._embed_text(text_tokens, text_mask, drop_text, B, emb.dtype)
            emb = emb + self.text_pool_proj(pooled)
            text = self.text_proj(text)
            if self.words_proj is not None:
                text = text + self._embed_words(text_words, text_tokens, text.dtype)
            tokens.append(self._encode_text(text, text_valid))
            masks.append(text_valid)
        elif text_tokens is not None:
            raise ValueError("this UNet has text_width=None (no text conditioning) but was given text_tokens")
        if not tokens:
            return emb, None, None
        context = tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=1)  # (B, S, E)
        return emb, context, torch.cat(masks, dim=1) if c.text_width else None

    def _embed_words(self, words: Tensor | None, text_tokens: Tensor | None, dtype: torch.dtype) -> Tensor:
        """(B, 1 + L, E): the projected word embeddings, zero at the null token (and for text-less rows)."""
        if text_tokens is None:  # every row dropped: the context is the null token alone
            return torch.zeros((), dtype=dtype, device=self.words_proj.weight.device)
        B, L, W = text_tokens.shape
        if words is None or words.shape != (B, L, W):
            got = None if words is None else tuple(words.shape)
            raise ValueError(
                f"this UNet reads the caption's CLIP word embeddings (text_words=True): pass text_words of "
                f"shape ({B}, {L}, {W}) like text_tokens (ClipAdapter.embed_text(...).words), got {got}"
            )
        words = self.words_proj(self.words_norm(words.to(dtype)))
        return torch.cat([words.new_zeros(B, 1, words.shape[-1]), words], dim=1)

    def _encode_text(self, text: Tensor, valid: Tensor) -> Tensor:
        """Run the text blocks over (B, S, E) projected tokens; every token reads every valid one."""
        if not len(self.text_blocks):
            return text
        S = text.shape[1]
        text = text + self.text_pos[:, :S].to(text.dtype)
        eye = torch.eye(S, dtype=torch.bool, device=text.device)
        mask = (valid[:, None, :] | eye)[:, None]  # (B, 1, S, S); a padding query reads itself, never NaN
        for block in self.text_blocks:
            text = block(text, mask)
        return text

    def _drop_masks(self, cond_drop: Tensor | None, B: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(B,) bool masks of the rows whose image embedding and whose text are replaced by the null ones."""
        if cond_drop is not None:
            if cond_drop.shape not in ((B,), (B, 2)):
                raise ValueError(f"cond_drop must have shape ({B},) or ({B}, 2), got {tuple(cond_drop.shape)}")
            cond_drop = cond_drop.to(device=device, dtype=torch.bool)
            return (cond_drop, cond_drop) if cond_drop.ndim == 1 else (cond_drop[:, 0], cond_drop[:, 1])
        if self.training:
            rand = torch.rand(2, B, device=device)
            return rand[0] < self.config.cond_drop_image, rand[1] < self.config.cond_drop_text
        none = torch.zeros(B, dtype=torch.bool, device=device)
        return none, none

    def _image_or_null(self, image_embed: Tensor | None, drop: Tensor, B: int) -> Tensor:
        null = self.null_image_embed
        if image_embed is None:
            if not bool(drop.all()):
                raise ValueError(
                    f"this UNet is conditioned on CLIP image embeddings (clip_dim={self.config.clip_dim}): pass "
                    "image_embed (B, clip_dim), or cond_drop=True for every row to run it unconditionally"
                )
            return null.expand(B, -1)
        if image_embed.shape != (B, self.config.clip_dim):
            raise ValueError(
                f"image_embed must have shape ({B}, {self.config.clip_dim}), got {tuple(image_embed.shape)}"
            )
        return torch.where(drop[:, None], null.to(image_embed.dtype), image_embed)

    def _embed_text(
        self, text_tokens: Tensor | None, text_mask: Tensor | None, drop: Tensor, B: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised text tokens behind the null token, their validity, and the pooled end-of-text feature.

        Returns:
            text (B, 1 + L, W) after LayerNorm; valid (B, 1 + L) bool, the null token always True and the text
            tokens True where real and not dropped; pooled (B, W): the last valid token, i.e. CLIP's EOT token,
            or the null token for a dropped row.
        """
        c = self.config
        null = self.null_text_token.to(dtype).expand(B, 1, -1)
        if text_tokens is None:
            if not bool(drop.all()):
                raise ValueError(
                    f"this UNet is conditioned on text (text_width={c.text_width}): pass text_tokens "
                    "(B, L, text_width) and text_mask, or cond_drop=True for every row to run it unconditionally"
                )
            text = self.text_norm(null)
            return text, drop.new_ones(B, 1), text[:, 0]
        if text_tokens.ndim != 3 or text_tokens.shape[0] != B or text_tokens.shape[2] != c.text_width:
            raise ValueError(f"text_tokens must have shape ({B}, L, {c.text_width}), got {tuple(text_tokens.shape)}")
        L = text_tokens.shape[1]
        if L > c.text_ctx:
            raise ValueError(f"text_tokens has {L} tokens, more than text_ctx={c.text_ctx}")
        if text_mask is not None and text_mask.shape != (B, L):
            raise ValueError(f"text_mask must have shape ({B}, {L}) like text_tokens, got {tuple(text_mask.shape)}")
        valid = drop.new_ones(B, L) if text_mask is None else text_mask.to(device=drop.device, dtype=torch.bool)
        valid = torch.cat([drop.new_ones(B, 1), valid & ~drop[:, None]], dim=1)  # (B, 1 + L)
        text = self.text_norm(torch.cat([null, text_tokens.to(dtype)], dim=1))  # (B, 1 + L, W)
        last = (valid * torch.arange(L + 1, device=valid.device)).argmax(dim=1)  # (B,): 0 = the null token
        return text, valid, text[torch.arange(B, device=text.device), last]
