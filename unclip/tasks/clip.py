"""Training task for a CLIP trained from scratch on image-caption pairs (Radford et al. 2021).

Our machines cannot download CLIP weights, so the cascade's default CLIPs are trained here on the project's
own data (procedural shapes scenes, OpenMoji emoji). The architecture is an open_clip model config
(`clip.model_config`: embed_dim, vision_cfg, text_cfg); the loss is open_clip's symmetric contrastive loss
with the learned temperature, its features gathered across data-parallel ranks. Images go through the same
preprocessing that the exported CLIP records and `ClipAdapter.embed_image` applies (resize, centre crop,
mean/std), captions through the model's own tokenizer. No augmentation: random crops would move the shapes
and break the captions' positions and relations.

Hard negatives. In a batch of random captions, a CLIP can match every image to its caption by colours and
shapes alone, so nothing makes it see a relation or which object comes first: the shapes CLIP trained so
scores "A above B" over "A below B" at chance (`python -m unclip.eval clip`). When the dataset's items hold
"negatives" (`data.options.hard_negatives`, e.g. [relation, swap]: the caption made wrong in that one thing),
each image is also scored against its own caption and its negatives, a softmax over those alone, and that
cross-entropy is added to the contrastive loss (NegCLIP, Yuksekgonul et al. 2023, adds such captions to
the contrastive softmax instead; the separate term keeps open_clip's gathered loss as it is). With several
processes each computes the term over its own images. Validation then reports how often the caption beats
each of its negatives, per kind.

Validation reports zero-shot retrieval among the pairs of the validation split (`data.val_size`, never
trained on), text -> image and image -> text top-1 and top-5, for the online and the EMA model, and the
contrastive loss over the whole validation set at once (so it depends on val_size, not on the batch size). The
export is a `save_clip` folder that `ClipAdapter.from_checkpoint` and open_clip's `local-dir:` both load.

With `model.noise_aware: true` the run is GLIDE's noise-aware CLIP instead (`unclip.tasks.noised_clip`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from unclip.clip_models import (
    build_clip_model,
    build_tokenizer,
    contrastive_loss,
    default_preprocess_cfg,
    image_transform,
    save_clip,
    set_preprocess_cfg,
)
from unclip.config import RunConfig
from unclip.data import build_dataset, collate
from unclip.noised_clip import clip_model_config

MAX_LOGIT_SCALE = 100.0  # Radford et al. 2021, section 2.5: the learned 1/temperature is clipped at 100
EVAL_BATCH = 256


class ClipTask:
    """The `Task` for `kind: clip` runs: a randomly initialised open_clip CLIP and its contrastive loss."""

    kind = "clip"

    def __new__(cls, config: RunConfig):
        # `model.noise_aware: true` makes the run a noise-aware CLIP's (unclip.tasks.noised_clip)
        if cls is ClipTask and clip_model_config(config.model).noise_aware:
            from unclip.tasks.noised_clip import NoisedClipTask

            return super().__new__(NoisedClipTask)
        return super().__new__(cls)

    def __init__(self, config: RunConfig):
        _check_config(config)
        self.config = config
        self.model_config = config.clip.model_config
        self.model = build_clip_model(self.model_config, seed=config.train.seed)
        if config.train.gradient_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.preprocess_cfg = default_preprocess_cfg(self.model_config)
        set_preprocess_cfg(self.model, self.preprocess_cfg)  # the EMA copy and the export carry it too
        self.preprocess = image_transform(self.preprocess_cfg)
        self.tokenizer = build_tokenizer(self.model_config)
        self.train_dataset = build_dataset(config.data, split="train")
        self.val_dataset = build_dataset(config.data, split="val")
        self.collate_fn = collate
        self.device = torch.device("cpu")
        self.contrastive_loss = contrastive_loss()
        self._val: dict | None = None
        self.negative_kinds = list(getattr(self.train_dataset, "hard_negatives", []))

    def setup(self, device: torch.device) -> None:
        self.device = device
        if dist.is_available() and dist.is_initialized():
            self.contrastive_loss = contrastive_loss(rank=dist.get_rank(), world_size=dist.get_world_size())

    def pixels(self, images: Tensor) -> Tensor:
        """Preprocessed pixels (B, 3, S, S) from images in [-1, 1]."""
        return self.preprocess((images.float().to(self.device) + 1) / 2)

    def inputs(self, images: Tensor, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Model inputs: preprocessed pixels (B, 3, S, S) from images in [-1, 1], and (B, L) token ids."""
        return self.pixels(images), self.tokenizer(list(captions)).to(self.device)

    def features(self, model: nn.Module, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The model's (image features, text features, exp(logit scale)) for images in [-1, 1] and token ids."""
        return model(image=self.pixels(images), text=ids)[:3]

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, float]]:
        ids = self.tokenizer(list(batch["caption"])).to(self.device)
        rows, slots, negatives = _flatten_negatives(batch.get("negatives"))
        if negatives:  # one forward for captions and negatives, so that a DDP-wrapped model sees one call
            ids = torch.cat([ids, self.tokenizer(negatives).to(self.device)])
        image_features, text_features, logit_scale = self.features(model, batch["image"], ids)  # (B, D), (B+N, D)
        logit_scale = logit_scale.clamp(max=MAX_LOGIT_SCALE)
        b = len(batch["image"])
        loss = self.contrastive_loss(image_features, text_features[:b], logit_scale)
        logs = {"logit_scale": logit_scale.item()}
        if negatives:
            hard, beaten = hard_negative_loss(
                image_features, text_features[:b], text_features[b:], rows, slots, logit_scale
            )
            loss = loss + hard
            logs.update(hard_negative_loss=hard.item(), hard_negative_acc=beaten.float().mean().item())
        return loss, logs

    # ---- evaluation ----

    def _val_pairs(self) -> dict:
        if self._val is None:
            batches = list(DataLoader(self.val_dataset, batch_size=EVAL_BATCH, collate_fn=collate))
            self._val = {
                "images": torch.cat([b["image"] for b in batches]),
                "captions": [c for b in batches for c in b["caption"]],
                "negatives": [n for b in batches for n in b.get("negatives", [])],
            }
        return self._val

    @torch.no_grad()
    def encode(self, model: nn.Module, images: Tensor, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """L2-normalised image and text features (N, D) and the clamped logit scale, in chunks."""
        image_features = []
        for start in range(0, len(captions), EVAL_BATCH):
            pixels = self.pixels(images[start : start + EVAL_BATCH])
            image_features.append(model.encode_image(pixels, normalize=True).float())
        logit_scale = model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        return torch.cat(image_features), self.encode_texts(model, captions), logit_scale

    @torch.no_grad()
    def encode_texts(self, model: nn.Module, texts: list[str]) -> Tensor:
        """L2-normalised text features (N, D), in chunks."""
        chunks = [texts[start : start + EVAL_BATCH] for start in range(0, len(texts), EVAL_BATCH)]
        features = [model.encode_text(self.tokenizer(c).to(self.device), normalize=True) for c in chunks]
        return torch.cat(features).float()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ema_model: nn.Module) -> dict[str, float]:
        val = self._val_pairs()
        images, captions = val["images"], val["captions"]
        rows, slots, negatives = _flatten_negatives(val["negatives"] or None)
        metrics = {}
        for prefix, m in (("val", model), ("val_ema", ema_model)):
            image_features, text_features, logit_scale = self.encode(m, images, captions)
            metrics[f"{prefix}/loss"] = contrastive_loss()(image_features, text_features, logit_scale).item()
            retrieval = retrieval_metrics(image_features, text_features, captions)
            metrics.update({f"{prefix}/{k}": v for k, v in retrieval.items()})
            if negatives:
                negative_features = self.encode_texts(m, negatives)
                _, beaten = hard_negative_loss(
                    image_features, text_features, negative_features, rows, slots, logit_scale
                )
                for slot, kind in enumerate(self.negative_kinds):
                    if (slots == slot).any():
                        metrics[f"{prefix}/beats_{kind}"] = beaten[slots == slot].float().mean().item()
        return metrics

    def export(self, model: nn.Module, directory: Path) -> None:
        save_clip(model, self.model_config, directory, preprocess_cfg=self.preprocess_cfg)


def _flatten_negatives(negatives: list[list[str | None]] | None) -> tuple[Tensor, Tensor, list[str]]:
    """A batch's per-item hard negatives (None where a kind does not apply) as flat lists: for each negative
    caption, the row of its image and the slot (its kind's index)."""
    rows, slots, texts = [], [], []
    for row, item in enumerate(negatives or []):
        for slot, text in enumerate(item):
            if text is not None:
                rows.append(row)
                slots.append(slot)
                texts.append(text)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(slots, dtype=torch.long), texts


def hard_negative_loss(
    image_features: Tensor,
    text_features: Tensor,
    negative_features: Tensor,
    rows: Tensor,
    slots: Tensor,
    logit_scale: Tensor,
) -> tuple[Tensor, Tensor]:
    """Each image against its own caption and the hard negatives made from that caption.

    Args:
        image_features, text_features: (B, D) L2-normalised features of the pairs.
        negative_features: (N, D) L2-normalised features of the negative captions.
        rows, slots: (N,) the image each negative belongs to, and its kind's index (one negative per kind).
        logit_scale: the exponentiated temperature.

    Returns:
        (the mean over images with at least one negative of the cross-entropy of a softmax over the caption
        and that image's negatives, (N,) bool: whether the caption scored higher than each negative).
    """
    rows, slots = rows.to(image_features.device), slots.to(image_features.device)
    positive = (image_features * text_features).sum(-1)  # (B,)
    negative = (image_features[rows] * negative_features).sum(-1)  # (N,)
    shape = (len(positive), 1 + int(slots.max()) + 1)  # column 0: the caption; 1 + slot: a negative
    logits = positive.new_zeros(shape)
    logits[:, 0] = positive
    logits[rows, 1 + slots] = negative
    valid = torch.zeros(shape, dtype=torch.bool, device=positive.device)
    valid[:, 0] = True
    valid[rows, 1 + slots] = True
    # mask after scaling: a -inf scaled by logit_scale would give the scale a NaN gradient
    logits = (logit_scale * logits).masked_fill(~valid, float("-inf"))
    has = valid[:, 1:].any(dim=1)
    target = torch.zeros(int(has.sum()), dtype=torch.long, device=positive.device)
    loss = F.cross_entropy(logits[has], target)
    return loss, positive[rows] > negative


def retrieval_metrics(
    image_features: Tensor, text_features: Tensor, captions: list[str], ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Zero-shot retrieval among N image-caption pairs, in both directions.

    A retrieved item counts as correct when its caption equals the query's: procedural datasets repeat
    captions ("a red circle" describes many scenes), and an image whose caption is identical is an equally
    right answer.

    Args:
        image_features, text_features: (N, D) features of the pairs, in the same order.
        captions: the N captions.
        ks: the k of each top-k accuracy (capped at N).

    Returns:
        {"t2i_top{k}": fraction of captions whose top-k images hold a right one, "i2t_top{k}": the same for
        images and their top-k captions}.
    """
    if not len(captions) == len(image_features) == len(text_features):
        raise ValueError(f"{len(image_features)} images, {len(text_features)} texts and {len(captions)} captions")
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    labels = torch.tensor([ids[c] for c in captions], device=image_features.device)
    same = labels[:, None] == labels[None, :]  # (N, N) pairs with equal captions
    similarity = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    metrics = {}
    for direction, scores in (("t2i", similarity.T), ("i2t", similarity)):  # rows: queries, columns: candidates
        for k in ks:
            top = scores.topk(min(k, len(captions)), dim=1).indices  # (N, k)
            metrics[f"{direction}_top{k}"] = same.gather(1, top).any(dim=1).float().mean().item()
    return metrics


def _check_config(config: RunConfig) -> None:
    clip = config.clip
    if clip.model_config is None:
        raise ValueError(
            "a clip run trains the architecture in clip.model_config (an open_clip model config with embed_dim, "
            "vision_cfg and text_cfg); see configs/clip/tiny.yaml"
        )
    if clip.checkpoint or clip.model_name or clip.pretrained:
        raise ValueError(
            "a clip run trains from scratch: leave clip.checkpoint, clip.model_name and clip.pretrained unset "
            "and give the architecture in clip.model_config"
        )
    if config.data.dataset == "embeddings":
        raise ValueError("a CLIP trains on image-caption pairs; data.dataset=embeddings holds no images")
