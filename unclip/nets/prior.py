"""The diffusion prior network: a causal Transformer from CLIP text embeddings to a CLIP image embedding.

Written from DALL·E 2 (Ramesh et al. 2022, section 2.1 and appendix C): a decoder-only Transformer with
a causal attention mask reads, in order, the encoded text tokens, the pooled CLIP text embedding, an
embedding of the diffusion timestep, the noised CLIP image embedding and a final learned query token,
whose output predicts the clean image embedding x_0. The image embedding lives in a normalised space
(per-dimension mean and std of the training image embeddings, kept as buffers so that they travel with
the weights); the diffusion runs in that space and the pipeline calls `denormalize` at the end.

Classifier-free guidance (Ho & Salimans 2022) drops only the text conditioning: the text tokens are
masked out and the pooled text embedding is replaced by a learned null embedding. x_t is always seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unclip.nets.layers import TransformerBlock, timestep_embedding

# tokens after the text tokens: pooled text embedding, timestep, noised image embedding, final query
NUM_TAIL_TOKENS = 4


@dataclass
class PriorConfig:
    clip_dim: int = 768  # D, width of the CLIP text and image embeddings
    text_width: int | None = 768  # W of the per-token text encodings; None or 0: pooled text embedding only
    text_ctx: int = 77  # L, the most text tokens
    width: int = 2048
    layers: int = 20
    heads: int = 32
    dropout: float = 0.0
    cond_drop_prob: float = 0.1  # chance of dropping the text condition in training, for CFG
    gradient_checkpointing: bool = False
    num_timesteps: int = 1000  # t is rescaled to [0, 1000) before the sinusoidal embedding

    def __post_init__(self):
        if not self.text_width:
            self.text_width = None
        for name in ("clip_dim", "text_ctx", "width", "layers", "heads", "num_timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.text_width is not None and self.text_width < 0:
            raise ValueError(f"model.text_width must be > 0, or null for no text tokens; got {self.text_width}")
        if self.width % self.heads:
            raise ValueError(f"model.width {self.width} is not divisible by model.heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"model.cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")


def attention_mask(text_mask: Tensor, tail: int = NUM_TAIL_TOKENS) -> Tensor:
    """Boolean SDPA mask (True = may attend) for a sequence of L text tokens followed by `tail` tokens.

    Causal, and no query attends a padding key. Each token also attends itself, so that a padding query (whose
    earlier keys may all be padding) never has a fully masked row, which would make SDPA return NaN; real
    tokens never read padding, so this changes nothing they compute.

    Args:
        text_mask: (B, L) bool, True for real text tokens.

    Returns:
        (B, 1, L + tail, L + tail) bool.
    """
    B, L = text_mask.shape
    S = L + tail
    keys = torch.cat([text_mask, text_mask.new_ones(B, tail)], dim=1)  # (B, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=text_mask.device).tril()
    eye = torch.eye(S, dtype=torch.bool, device=text_mask.device)
    return ((causal & keys[:, None, :]) | eye)[:, None]


class TextInputs:
    """The caption inputs of a prior Transformer (diffusion or autoregressive): classifier-free dropout and the
    projected text tokens. Uses the network's config (cond_drop_prob, text_width, width), embed_tokens,
    pos_embed and text_ctx."""

    def _cond_drop(self, cond_drop: Tensor | None, B: int, device: torch.device) -> Tensor:
        if cond_drop is None:
            if self.training and self.config.cond_drop_prob > 0:
                return torch.rand(B, device=device) < self.config.cond_drop_prob
            return torch.zeros(B, dtype=torch.bool, device=device)
        if cond_drop.shape != (B,):
            raise ValueError(f"cond_drop must have shape ({B},), got {tuple(cond_drop.shape)}")
        return cond_drop.to(device=device, dtype=torch.bool)

    def _embed_tokens(
        self, text_tokens: Tensor | None, text_mask: Tensor | None, cond_drop: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Project the text tokens and add positions; dropped rows get every token masked out."""
        B = len(cond_drop)
        if self.embed_tokens is None:
            return self.pos_embed.new_zeros(B, 0, self.config.width), cond_drop.new_zeros(B, 0)
        if text_tokens is None:
            raise ValueError(
                f"this prior reads text tokens (model.text_width={self.config.text_width}): pass text_tokens "
                "(B, L, W), or use a config with text_width: null for a pooled-embedding-only prior"
            )
        L = text_tokens.shape[1]
        if text_tokens.shape != (B, L, self.config.text_width) or L > self.text_ctx:
            raise ValueError(
                f"text_tokens must be (B={B}, L<={self.text_ctx}, W={self.config.text_width}), "
                f"got {tuple(text_tokens.shape)}"
            )
        mask = cond_drop.new_ones(B, L) if text_mask is None else text_mask.bool()
        if mask.shape != (B, L):
            raise ValueError(f"text_mask must be (B, L) = ({B}, {L}), got {tuple(mask.shape)}")
        mask = mask & ~cond_drop[:, None]
        tokens = self.embed_tokens(text_tokens.masked_fill(~mask[..., None], 0.0))  # (B, L, W)
        return tokens + self.pos_embed[:L], mask


class PriorTransformer(TextInputs, nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        D, W = config.clip_dim, config.width
        self.text_ctx = config.text_ctx if config.text_width else 0
        self.embed_tokens = nn.Linear(config.text_width, W) if config.text_width else None
        self.embed_text = nn.Linear(D, W)
        self.null_text_embed = nn.Parameter(torch.zeros(W))
        self.embed_time = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, W))
        self.embed_x = nn.Linear(D, W)
        self.query = nn.Parameter(torch.zeros(W))
        self.pos_embed = nn.Parameter(torch.zeros(self.text_ctx + NUM_TAIL_TOKENS, W))
        self.blocks = nn.ModuleList(TransformerBlock(W, config.heads, config.dropout) for _ in range(config.layers))
        self.ln_out = nn.LayerNorm(W)
        self.proj_out = nn.Linear(W, D)

        self.register_buffer("image_mean", torch.zeros(D))
        self.register_buffer("image_std", torch.ones(D))
        self.register_buffer("normalization_set", torch.tensor(False))
        self._init_weights()

    def _init_weights(self):
        """GPT-2 init, with the output projection at zero.

        A zero output predicts x_0 = 0, the mean of the normalised image embeddings: the best constant guess,
        and the exact optimum at t = T where x_t holds no information. Training then starts from loss ≈ 1 per
        dimension instead of adding the variance of a random readout, and gradients reach the trunk from the
        second step on (as in DiT's zero-initialised final layer).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp[-1].weight, std=residual_std)
        for param in (self.null_text_embed, self.query, self.pos_embed):
            nn.init.normal_(param, std=0.02)
        nn.init.zeros_(self.proj_out.weight)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        text_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        cond_drop: Tensor | None = None,
    ) -> Tensor:
        """Predict the normalised clean image embedding x_0.

        Args:
            x_t: noised normalised image embedding, (B, D).
            t: integer timesteps in [0, num_timesteps), (B,).
            text_embed: pooled CLIP text embedding, (B, D).
            text_tokens: per-token CLIP text encodings, (B, L, W) with L <= text_ctx; required when the config
                has a text_width, ignored when it has none.
            text_mask: (B, L) bool, True for real tokens; None means all are real.
            cond_drop: (B,) bool, True where the row's text condition is replaced by the null one. None draws
                it with probability cond_drop_prob in training mode and drops nothing in eval mode.

        Returns:
            predicted x_0, (B, D), in the normalised space.
        """
        B = x_t.shape[0]
        cond_drop = self._cond_drop(cond_drop, B, x_t.device)
        tokens, token_mask = self._embed_tokens(text_tokens, text_mask, cond_drop)  # (B, L, W), (B, L)

        text = torch.where(cond_drop[:, None], self.null_text_embed, self.embed_text(text_embed))  # (B, W)
        t = t.expand(B) if t.ndim == 0 else t
        t_freq = timestep_embedding(t.float() * (1000.0 / self.config.num_timesteps), self.config.width)
        t_emb = self.embed_time(t_freq.to(x_t.dtype))  # (B, W)
        query = self.query.expand(B, -1)  # (B, W)
        tail = torch.stack([text, t_emb, self.embed_x(x_t), query], dim=1)  # (B, 4, W)
        # the tail always sits at positions text_ctx.., so adding padding tokens changes nothing
        h = torch.cat([tokens, tail + self.pos_embed[self.text_ctx :]], dim=1)  # (B, L + 4, W)

        mask = attention_mask(token_mask)  # (B, 1, L + 4, L + 4)
        checkpointing = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, mask, use_reentrant=False) if checkpointing else block(h, mask)
        return self.proj_out(self.ln_out(h[:, -1]))  # (B, D)

    # image-embedding normalisation: the diffusion runs on per-dimension standardised embeddings

    @staticmethod
    def compute_normalization(image_embeds: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
        """Per-dimension mean and std of training image embeddings.

        Args:
            image_embeds: (N, D) CLIP image embeddings, N >= 2.
            eps: floor on the std, so that a constant dimension does not divide by zero.

        Returns:
            (mean, std), each (D,) float32.
        """
        if image_embeds.ndim != 2 or image_embeds.shape[0] < 2:
            raise ValueError(f"image_embeds must be (N >= 2, D), got {tuple(image_embeds.shape)}")
        x = image_embeds.detach().double()
        mean, std = x.mean(0), x.std(0, correction=0).clamp_min(eps)
        return mean.float(), std.float()

    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        """Store the image-embedding statistics that `normalize` and `denormalize` use."""
        D = self.config.clip_dim
        if mean.shape != (D,) or std.shape != (D,):
            raise ValueError(f"mean and std must be ({D},), got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("mean and std must be finite, and std > 0")
        self.image_mean.copy_(mean)
        self.image_std.copy_(std)
        self.normalization_set.fill_(True)

    @property
    def has_normalization(self) -> bool:
        return bool(self.normalization_set)

    def require_normalization(self) -> None:
        """Raise ValueError unless `set_normalization` was called (or loaded from a checkpoint)."""
        if not self.has_normalization:
            raise ValueError(
                "the prior has no image-embedding statistics: call "
                "model.set_normalization(*PriorTransformer.compute_normalization(train_image_embeds)) "
                "before training, so that the saved model can denormalise its samples"
            )

    def normalize(self, image_embed: Tensor) -> Tensor:
        """(B, D) CLIP image embedding -> the normalised space the diffusion runs in."""
        mean, std = self.image_mean.float(), self.image_std.float()
        return ((image_embed.float() - mean) / std).to(image_embed.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        """(B, D) normalised embedding -> CLIP image embedding."""
        mean, std = self.image_mean.float(), self.image_std.float()
        return (x.float() * std + mean).to(x.dtype)
