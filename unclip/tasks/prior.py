"""Training task for the diffusion prior: CLIP text embedding -> CLIP image embedding (DALL·E 2 §2.1).

The prior is trained on (caption, image) pairs encoded by a frozen CLIP on the fly, or on precomputed
embedding shards (train/embed.py, or published clip-retrieval embeddings). Image embeddings are L2-normalised,
then standardised per dimension with statistics computed here from the training data; the statistics are
buffers of the network and travel with its weights.

Validation reports the losses of the online and EMA networks and, from EMA samples, the paper's cosine
metrics: predicted vs true image embedding, predicted vs its text embedding, predicted vs an unrelated
caption's text embedding, and top-1 retrieval of the true image among the validation images, next to the
same retrieval with the raw text embedding (the ablation of DALL·E 2 §5.1 that motivates the prior).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from unclip.checkpoint import save_model
from unclip.config import RunConfig
from unclip.data import build_dataset, collate
from unclip.data.embeddings import encode_batch
from unclip.diffusion import GaussianDiffusion
from unclip.eval.metrics import prior_metrics
from unclip.lora import preserving_step
from unclip.nets.prior import PriorTransformer
from unclip.sampling import sample_prior, text_cond
from unclip.tasks.conditioning import check_clip_dims, load_clip

logger = logging.getLogger(__name__)

NORM_SAMPLES = 4096  # training examples used for the per-dimension image-embedding statistics


class PriorTask:
    kind = "prior"

    def __init__(self, config: RunConfig, clip=None):
        self.config = config
        precomputed = config.data.dataset == "embeddings"
        self.clip = clip if clip is not None or precomputed else load_clip(config.clip)
        model_config = config.model
        model_config.gradient_checkpointing = config.train.gradient_checkpointing
        check_clip_dims(
            self.clip,
            clip_dim=model_config.clip_dim,
            text_width=model_config.text_width,
            text_ctx=model_config.text_ctx,
        )
        self.model = self.build_model(model_config)
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)
        self.train_dataset = build_dataset(config.data, split="train")
        self.val_dataset = build_dataset(config.data, split="val")
        if precomputed and self.train_dataset.embed_dim != model_config.clip_dim:
            raise ValueError(
                f"the embeddings under {config.data.path} have {self.train_dataset.embed_dim} dims but "
                f"model.clip_dim is {model_config.clip_dim}; set model.clip_dim to match"
            )
        if precomputed and model_config.text_width and not self.train_dataset.has_text_tokens:
            raise ValueError(
                f"the embedding shards under {config.data.path} have no per-token text encodings; set "
                "model.text_width: null to train on pooled embeddings, or re-embed with train/embed.py --tokens"
            )
        self.collate_fn = collate
        self.device = torch.device("cpu")
        self.fit_statistics()

    def build_model(self, model_config):
        return PriorTransformer(model_config)

    def fit_statistics(self) -> None:
        """The image-embedding statistics the network keeps with its weights, from the training data."""
        self.model.set_normalization(*PriorTransformer.compute_normalization(self._training_image_embeds()))

    def setup(self, device: torch.device) -> None:
        self.device = device
        if self.clip is not None:
            self.clip.to(device)

    def _batches(self, dataset, limit: int, batch_size: int = 256):
        subset = Subset(dataset, range(min(limit, len(dataset))))
        for batch in DataLoader(subset, batch_size=batch_size, collate_fn=collate):
            yield encode_batch(self.clip, batch, self.device)

    @torch.no_grad()
    def _training_image_embeds(self, limit: int = NORM_SAMPLES) -> Tensor:
        return torch.cat([c["image_embed"] for c in self._batches(self.train_dataset, limit)]).cpu()

    def _cond(self, c: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self.model.config.text_width:
            return text_cond(c["text_embed"], None, None)
        return text_cond(c["text_embed"], c["text_tokens"], c["text_mask"])

    def loss(self, model, batch) -> tuple[Tensor, dict[str, float]]:
        c = encode_batch(self.clip, batch, self.device)
        x_0 = self.model.normalize(c["image_embed"])
        lora = self.config.train.lora
        if lora and lora.preserve:
            return preserving_step(lora, self.diffusion, model, x_0, self._cond(c), batch["caption"])
        return self.diffusion.training_loss(model, x_0, cond=self._cond(c))["loss"].mean(), {}

    @torch.no_grad()
    def evaluate(self, model, ema_model) -> dict[str, float]:
        val = [c for c in self._batches(self.val_dataset, self.config.data.val_size)]
        c = {k: torch.cat([b[k] for b in val]) if val[0][k] is not None else None for k in val[0]}
        metrics = {"val/loss": self.val_loss(model, c), "val_ema/loss": self.val_loss(ema_model, c)}
        predicted = sample_prior(
            ema_model, self.diffusion, **self._cond(c), generator=torch.Generator().manual_seed(0)
        )
        metrics.update(
            {f"val_ema/{k}": v for k, v in prior_metrics(predicted, c["text_embed"], c["image_embed"]).items()}
        )
        return metrics

    def val_loss(self, model, c: dict[str, Tensor]) -> float:
        """The loss at fixed timesteps and noise, so that values are comparable across evaluations."""
        gen = torch.Generator().manual_seed(0)
        x_0 = model.normalize(c["image_embed"])
        t = torch.randint(0, self.diffusion.num_timesteps, (len(x_0),), generator=gen).to(x_0.device)
        noise = torch.randn(x_0.shape, generator=gen).to(x_0.device)
        return self.diffusion.training_loss(model, x_0, cond=self._cond(c), t=t, noise=noise)["loss"].mean().item()

    def export(self, model, directory: Path) -> None:
        save_model(model, directory, kind="prior", diffusion=self.config.diffusion, clip=self.config.clip)
