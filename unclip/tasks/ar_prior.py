"""Training task for the autoregressive prior (`model.kind: autoregressive`): caption -> codes of the CLIP image
embedding (DALL·E 2 §2.1), beside the diffusion prior's task, whose data, conditioning and validation it shares.

Before training, the PCA and the code buckets are fitted on the training image embeddings (unclip/nets/ar_prior.py)
and kept as buffers of the network. The loss is the cross-entropy of each code given the caption and the codes
before it. Validation reports the loss of the online and EMA networks, how much of the image embedding survives
the codes alone (`val/code_cos`: cosine between an embedding and its de-quantised, inverse-PCA reconstruction, the
best a sample can do), and the diffusion prior's cosine and retrieval metrics on EMA samples.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from unclip.data.embeddings import encode_batch
from unclip.eval.metrics import prior_metrics
from unclip.nets.ar_prior import ARPrior
from unclip.sampling_ar import sample_ar_prior
from unclip.tasks.prior import PriorTask

logger = logging.getLogger(__name__)

PCA_SAMPLES = 16384  # training examples the PCA and the code buckets are fitted on


class ARPriorTask(PriorTask):
    def __init__(self, config, clip=None):
        if config.train.lora and config.train.lora.preserve:
            raise ValueError(
                "train.lora.preserve is for the diffusion stages; the autoregressive prior has no diffusion loss to "
                "add it to: set train.lora.preserve to 0"
            )
        super().__init__(config, clip)

    def build_model(self, model_config):
        return ARPrior(model_config)

    def fit_statistics(self) -> None:
        explained = self.model.fit_codes(self._training_image_embeds(PCA_SAMPLES))
        K, D = self.model.config.pca_dims, self.model.config.clip_dim
        logger.info("PCA: the first %d of %d components hold %.4f%% of the variance", K, D, 100 * explained[:K].sum())

    def code_loss(self, model, c: dict[str, Tensor]) -> Tensor:
        codes = self.model.encode(c["image_embed"])  # the buffers are the same in every copy of the network
        logits = model(codes, **self._cond(c))
        return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())

    def loss(self, model, batch) -> tuple[Tensor, dict[str, float]]:
        return self.code_loss(model, encode_batch(self.clip, batch, self.device)), {}

    def val_loss(self, model, c: dict[str, Tensor]) -> float:
        """The loss with the text kept (eval mode draws no condition drop), comparable across evaluations."""
        return self.code_loss(model, c).item()

    @torch.no_grad()
    def evaluate(self, model, ema_model) -> dict[str, float]:
        val = [c for c in self._batches(self.val_dataset, self.config.data.val_size)]
        c = {k: torch.cat([b[k] for b in val]) if val[0][k] is not None else None for k in val[0]}
        metrics = {"val/loss": self.val_loss(model, c), "val_ema/loss": self.val_loss(ema_model, c)}
        true = F.normalize(c["image_embed"].float(), dim=-1)
        metrics["val/code_cos"] = (ema_model.decode(ema_model.encode(true)) * true).sum(-1).mean().item()
        cond = self._cond(c)
        predicted = sample_ar_prior(
            ema_model,
            cond["text_embed"],
            cond.get("text_tokens"),
            cond.get("text_mask"),
            generator=torch.Generator().manual_seed(0),
        )
        metrics.update(
            {f"val_ema/{k}": v for k, v in prior_metrics(predicted, c["text_embed"], c["image_embed"]).items()}
        )
        return metrics
