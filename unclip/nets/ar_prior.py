"""The autoregressive prior network: a causal Transformer from the caption to discrete codes of a CLIP image embedding.

Written from DALL·E 2 (Ramesh et al. 2022, section 2.1), the alternative to the diffusion prior
(unclip/nets/prior.py). The CLIP image embedding is reduced by PCA, fitted on the training image embeddings, to
the `pca_dims` principal components that hold almost all of its variance; each component is quantised into
`buckets` equal buckets between its training minimum and maximum. A decoder-only Transformer with a causal mask
reads the encoded text tokens, the pooled CLIP text embedding and the codes so far, in the order of the components
(most variance first), and predicts the next code. Sampling draws the codes one at a time (`start`, then
`extend` for each code, with the keys and values of what was read cached); de-quantisation
(bucket centres) and the inverse PCA give back an image embedding, L2-normalised as the diffusion prior's are.

The PCA (mean and components) and the buckets' ranges are buffers, so they travel with the weights. Classifier-free
guidance drops the text as the diffusion prior does: the text tokens are masked out and the pooled text
embedding is replaced by a learned null embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unclip.nets.layers import TransformerBlock
from unclip.nets.prior import TextInputs, attention_mask

PRIOR_KINDS = ("diffusion", "autoregressive")


@dataclass
class ARPriorConfig:
    kind: str = "autoregressive"  # model.kind of a prior config: this network for "autoregressive"
    clip_dim: int = 768  # D, width of the CLIP text and image embeddings
    pca_dims: int = 64  # K, principal components kept: the length of the code sequence
    buckets: int = 1024  # codes per component
    text_width: int | None = 768  # W of the per-token text encodings; None or 0: pooled text embedding only
    text_ctx: int = 77  # L, the most text tokens
    width: int = 512
    layers: int = 8
    heads: int = 8
    dropout: float = 0.0
    cond_drop_prob: float = 0.1  # chance of dropping the text condition in training, for CFG
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.kind != "autoregressive":
            raise ValueError(f"model.kind of an autoregressive prior must be 'autoregressive', got {self.kind!r}")
        if not self.text_width:
            self.text_width = None
        for name in ("clip_dim", "pca_dims", "text_ctx", "width", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.pca_dims > self.clip_dim:
            raise ValueError(
                f"model.pca_dims is {self.pca_dims} but the embeddings have only model.clip_dim={self.clip_dim} dims; "
                "keep at most clip_dim components"
            )
        if self.buckets < 2:
            raise ValueError(f"model.buckets must be >= 2, got {self.buckets}")
        if self.text_width is not None and self.text_width < 0:
            raise ValueError(f"model.text_width must be > 0, or null for no text tokens; got {self.text_width}")
        if self.width % self.heads:
            raise ValueError(f"model.width {self.width} is not divisible by model.heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"model.cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")


# -- PCA and quantisation ----------------------------------------------------------------------------------


def fit_pca(image_embeds: Tensor, dims: int) -> tuple[Tensor, Tensor, Tensor]:
    """Principal components of (N, D) embeddings, by decreasing variance.

    Returns:
        (mean (D,), components (dims, D) with orthonormal rows, explained (D,): the fraction of the total variance
        that each of all D components holds), float32.
    """
    if image_embeds.ndim != 2 or image_embeds.shape[0] < 2:
        raise ValueError(f"image_embeds must be (N >= 2, D), got {tuple(image_embeds.shape)}")
    x = image_embeds.detach().double()
    mean = x.mean(0)
    _, s, v_t = torch.linalg.svd(x - mean, full_matrices=False)  # rows of v_t: components, s descending
    variance = s**2
    explained = torch.zeros(x.shape[1], dtype=torch.float64)
    explained[: len(variance)] = variance / variance.sum().clamp_min(1e-30)
    components = torch.zeros(dims, x.shape[1], dtype=torch.float64)
    kept = min(dims, v_t.shape[0])
    components[:kept] = v_t[:kept]
    return mean.float(), components.float(), explained.float()


def quantize(z: Tensor, low: Tensor, high: Tensor, buckets: int) -> Tensor:
    """(B, K) values -> (B, K) int64 codes: the index of the equal bucket of [low, high] each falls in (values
    outside the range go to the end buckets)."""
    width = (high - low).clamp_min(1e-12) / buckets
    return ((z.float() - low) / width).floor().clamp(0, buckets - 1).long()


def dequantize(codes: Tensor, low: Tensor, high: Tensor, buckets: int) -> Tensor:
    """(B, K) codes -> (B, K) float32 values at their buckets' centres."""
    width = (high - low).clamp_min(1e-12) / buckets
    return low + (codes.float() + 0.5) * width


class ARPrior(TextInputs, nn.Module):
    def __init__(self, config: ARPriorConfig):
        super().__init__()
        self.config = config
        D, K, W = config.clip_dim, config.pca_dims, config.width
        self.text_ctx = config.text_ctx if config.text_width else 0
        self.embed_tokens = nn.Linear(config.text_width, W) if config.text_width else None
        self.embed_text = nn.Linear(D, W)
        self.null_text_embed = nn.Parameter(torch.zeros(W))
        self.embed_codes = nn.Embedding(config.buckets, W)
        # positions: the text tokens, then the pooled text embedding and the codes 1..K-1 (code K is never read)
        self.pos_embed = nn.Parameter(torch.zeros(self.text_ctx + K, W))
        self.blocks = nn.ModuleList(TransformerBlock(W, config.heads, config.dropout) for _ in range(config.layers))
        self.ln_out = nn.LayerNorm(W)
        self.head = nn.Linear(W, config.buckets)

        self.register_buffer("pca_mean", torch.zeros(D))
        self.register_buffer("pca_components", torch.zeros(K, D))
        self.register_buffer("code_low", torch.zeros(K))
        self.register_buffer("code_high", torch.ones(K))
        self.register_buffer("pca_set", torch.tensor(False))
        self._init_weights()

    def _init_weights(self):
        """GPT-2 init, with the output head at zero (uniform first predictions)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.config.layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp[-1].weight, std=residual_std)
        for param in (self.null_text_embed, self.pos_embed):
            nn.init.normal_(param, std=0.02)
        nn.init.zeros_(self.head.weight)

    # -- the PCA codes ---------------------------------------------------------------------------------------

    def fit_codes(self, image_embeds: Tensor) -> Tensor:
        """Fit the PCA and the buckets' ranges on (N, D) training image embeddings (L2-normalised).

        Returns:
            the fraction of the variance that each of the D principal components holds, (D,).
        """
        D, K = self.config.clip_dim, self.config.pca_dims
        if image_embeds.ndim != 2 or image_embeds.shape[1] != D:
            raise ValueError(f"image_embeds must be (N, {D}), got {tuple(image_embeds.shape)}")
        mean, components, explained = fit_pca(image_embeds, K)
        z = (image_embeds.float() - mean) @ components.T  # (N, K)
        low, high = z.min(0).values, z.max(0).values
        if not (torch.isfinite(z).all() and torch.isfinite(mean).all()):
            raise ValueError("the image embeddings hold non-finite values; check the training data")
        self.pca_mean.copy_(mean)
        self.pca_components.copy_(components)
        self.code_low.copy_(low)
        self.code_high.copy_(torch.maximum(high, low + 1e-6))
        self.pca_set.fill_(True)
        return explained

    @property
    def has_codes(self) -> bool:
        return bool(self.pca_set)

    def require_codes(self) -> None:
        if not self.has_codes:
            raise ValueError(
                "the autoregressive prior has no PCA: call model.fit_codes(train_image_embeds) before training, "
                "so that the saved model can turn its codes back into image embeddings"
            )

    def project(self, image_embed: Tensor) -> Tensor:
        """(B, D) CLIP image embeddings -> (B, K) principal-component coordinates."""
        return (image_embed.float() - self.pca_mean.float()) @ self.pca_components.float().T

    def unproject(self, z: Tensor) -> Tensor:
        """(B, K) coordinates -> (B, D) embeddings (the inverse PCA; the dropped components are the mean's)."""
        return z.float() @ self.pca_components.float() + self.pca_mean.float()

    def encode(self, image_embed: Tensor) -> Tensor:
        """(B, D) CLIP image embeddings -> (B, K) codes."""
        return quantize(self.project(image_embed), self.code_low.float(), self.code_high.float(), self.config.buckets)

    def decode(self, codes: Tensor) -> Tensor:
        """(B, K) codes -> (B, D) L2-normalised CLIP image embeddings."""
        z = dequantize(codes, self.code_low.float(), self.code_high.float(), self.config.buckets)
        return F.normalize(self.unproject(z), dim=-1)

    # -- the Transformer -------------------------------------------------------------------------------------

    def forward(
        self,
        codes: Tensor,
        *,
        text_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        cond_drop: Tensor | None = None,
    ) -> Tensor:
        """Logits of each next code given the codes so far.

        Args:
            codes: (B, k) the first k codes, 0 <= k <= K (the full K in training: the last is not read).
            text_embed: pooled CLIP text embedding, (B, D).
            text_tokens: per-token CLIP text encodings, (B, L, W) with L <= text_ctx; required when the config
                has a text_width, ignored when it has none.
            text_mask: (B, L) bool, True for real tokens; None means all are real.
            cond_drop: (B,) bool, True where the row's text condition is replaced by the null one. None draws
                it with probability cond_drop_prob in training mode and drops nothing in eval mode.

        Returns:
            (B, min(k + 1, K), buckets) logits of codes 1..min(k + 1, K).
        """
        B, k = codes.shape
        K = self.config.pca_dims
        codes = codes[:, : K - 1]
        cond_drop = self._cond_drop(cond_drop, B, text_embed.device)
        tokens, token_mask = self._embed_tokens(text_tokens, text_mask, cond_drop)  # (B, L, W), (B, L)
        text = torch.where(cond_drop[:, None], self.null_text_embed, self.embed_text(text_embed))  # (B, W)
        tail = torch.cat([text[:, None], self.embed_codes(codes)], dim=1)  # (B, 1 + k', W)
        n = tail.shape[1]
        # the tail always sits at positions text_ctx.., so a shorter caption changes nothing
        h = torch.cat([tokens, tail + self.pos_embed[self.text_ctx : self.text_ctx + n]], dim=1)
        mask = attention_mask(token_mask, tail=n)
        checkpointing = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            h = checkpoint(block, h, mask, use_reentrant=False) if checkpointing else block(h, mask)
        return self.head(self.ln_out(h[:, tokens.shape[1] :]))  # (B, 1 + k', buckets)

    # -- sampling with cached keys and values: each new code costs one token's pass --------------------------------

    def start(
        self,
        *,
        text_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        cond_drop: Tensor | None = None,
    ) -> tuple[Tensor, dict]:
        """Read the text: the logits of code 1, (B, buckets), and the cache that `extend` continues from. The same
        numbers as `forward` with no codes (in eval mode), which `extend` keeps for each next code."""
        B = text_embed.shape[0]
        cond_drop = self._cond_drop(cond_drop, B, text_embed.device)
        tokens, token_mask = self._embed_tokens(text_tokens, text_mask, cond_drop)
        text = torch.where(cond_drop[:, None], self.null_text_embed, self.embed_text(text_embed))  # (B, W)
        h = torch.cat([tokens, (text + self.pos_embed[self.text_ctx])[:, None]], dim=1)
        cache = {"layers": [], "keys": torch.cat([token_mask, token_mask.new_ones(B, 1)], dim=1), "codes": 0}
        h = self._cached_blocks(h, attention_mask(token_mask, tail=1), cache)
        return self.head(self.ln_out(h[:, -1])), cache

    def extend(self, code: Tensor, cache: dict) -> Tensor:
        """Append each row's latest code, (B,): the logits of the code after it, (B, buckets)."""
        position = self.text_ctx + 1 + cache["codes"]
        if position >= self.pos_embed.shape[0]:
            raise ValueError(f"the prior predicts {self.config.pca_dims} codes; there is no code after the last")
        h = (self.embed_codes(code) + self.pos_embed[position])[:, None]  # (B, 1, W)
        cache["keys"] = torch.cat([cache["keys"], cache["keys"].new_ones(len(code), 1)], dim=1)
        cache["codes"] += 1
        h = self._cached_blocks(h, cache["keys"][:, None, None, :], cache)
        return self.head(self.ln_out(h[:, -1]))

    def _cached_blocks(self, h: Tensor, mask: Tensor, cache: dict) -> Tensor:
        """The Transformer blocks (as TransformerBlock computes them, without dropout) over the new tokens `h`,
        attending to the cached keys and values too, which it extends."""
        first = not cache["layers"]
        for i, block in enumerate(self.blocks):
            attn = block.attn
            B, S, C = h.shape
            qkv = attn.qkv(block.ln_1(h)).view(B, S, 3, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv  # (B, H, S, C/H)
            if first:
                cache["layers"].append((k, v))
            else:
                k = torch.cat([cache["layers"][i][0], k], dim=2)
                v = torch.cat([cache["layers"][i][1], v], dim=2)
                cache["layers"][i] = (k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            h = h + attn.proj(out.transpose(1, 2).reshape(B, S, C))
            h = h + block.mlp(block.ln_2(h))
        return h

    def loss(self, image_embed: Tensor, **cond) -> Tensor:
        """Mean cross-entropy of the codes of `image_embed` (B, D) under teacher forcing."""
        self.require_codes()
        codes = self.encode(image_embed)
        logits = self(codes, **cond)
        return F.cross_entropy(logits.float().reshape(-1, self.config.buckets), codes.reshape(-1))
