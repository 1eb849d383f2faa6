"""Training task for GLIDE's noise-aware CLIP (`kind: clip` with `model.noise_aware: true`, unclip.noised_clip).

The CLIP of `train.init_from` (a CLIP folder, or a noised-CLIP folder to continue from) is wrapped in a
`NoisedClip`; each training image is diffused to a uniformly drawn timestep of the run's `diffusion:` schedule
(the decoder's) before the image tower sees it, with that timestep. The loss is the CLIP task's: open_clip's
contrastive loss, plus the hard-negative term when the dataset gives negatives. The text tower is frozen unless
`model.train_text: true`.

Validation reports retrieval and, with hard negatives, how often the caption beats each negative, at a few
fixed timesteps (`EVAL_TIMESTEPS`, scaled to the schedule's length) with fixed noise, for the online and the
EMA model: "val_ema/t500/beats_relation" is the EMA model's rate on images noised to t = 500.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from unclip.clip import ClipAdapter
from unclip.config import RunConfig
from unclip.diffusion import GaussianDiffusion
from unclip.noised_clip import NoisedClip, clip_model_config, is_noised_clip, load_noised_clip, save_noised_clip
from unclip.tasks.clip import (
    EVAL_BATCH,
    ClipTask,
    _flatten_negatives,
    contrastive_loss,
    hard_negative_loss,
    retrieval_metrics,
)

EVAL_TIMESTEPS = (0, 250, 500, 750, 900)  # of a 1000-step schedule


class NoisedClipTask(ClipTask):
    """The `Task` for noise-aware clip runs; built by `ClipTask(config)` when `model.noise_aware` is true."""

    def __init__(self, config: RunConfig):
        super().__init__(config)
        self.options = clip_model_config(config.model)
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)
        self.model = NoisedClip(self.model, self.model_config, config.diffusion, self.preprocess_cfg)
        self.handles_init_from = True
        if config.train.init_from:
            self._init_from(config.train.init_from)
        if not self.options.train_text:
            for name, p in self.model.clip.named_parameters():
                if not name.startswith("visual.") and name != "logit_scale":
                    p.requires_grad_(False)

    def _init_from(self, source: str) -> None:
        if is_noised_clip(source):  # continue from a noise-aware CLIP: its timestep MLP too
            state = load_noised_clip(source).state_dict()
        else:
            state = {f"clip.{k}": v for k, v in ClipAdapter.from_checkpoint(source).model.state_dict().items()}
            state.update({k: v for k, v in self.model.state_dict().items() if k.startswith("time_embed.")})
        try:
            self.model.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as e:
            raise ValueError(
                f"train.init_from={source}: its CLIP does not fit clip.model_config of this run; copy the "
                f"model_cfg of {source}/open_clip_config.json into clip.model_config ({str(e)[:300]})"
            ) from None

    def noised(self, images: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] diffused to the timesteps t (B,), on the task's device."""
        noise = torch.randn(images.shape, generator=generator).to(self.device)
        return self.diffusion.q_sample(images.float().to(self.device), t.to(self.device), noise)

    def features(self, model: nn.Module, images: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = torch.randint(0, self.diffusion.num_timesteps, (len(images),))
        return model(image=self.noised(images, t), text=ids, t=t.to(self.device))

    def timesteps(self) -> list[int]:
        T = self.diffusion.num_timesteps
        return sorted({min(T - 1, round(t * T / 1000)) for t in EVAL_TIMESTEPS})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ema_model: nn.Module) -> dict[str, float]:
        val = self._val_pairs()
        images, captions = val["images"], val["captions"]
        rows, slots, negatives = _flatten_negatives(val["negatives"] or None)
        metrics = {}
        for prefix, m in (("val", model), ("val_ema", ema_model)):
            text_features = self.encode_texts(m.clip, captions)
            negative_features = self.encode_texts(m.clip, negatives) if negatives else None
            logit_scale = m.logit_scale()
            for step in self.timesteps():
                generator = torch.Generator().manual_seed(step)
                t = torch.full((len(images),), step, dtype=torch.long)
                noised = self.noised(images, t, generator)
                image_features = torch.cat(
                    [
                        m.encode_image(noised[s : s + EVAL_BATCH], t[s : s + EVAL_BATCH].to(self.device), True)
                        for s in range(0, len(images), EVAL_BATCH)
                    ]
                ).float()
                name = f"{prefix}/t{step}"
                loss = contrastive_loss()(image_features, text_features, logit_scale).item()
                metrics[f"{name}/loss"] = loss
                retrieval = retrieval_metrics(image_features, text_features, captions, ks=(1,))
                metrics.update({f"{name}/{k}": v for k, v in retrieval.items()})
                if negatives:
                    _, beaten = hard_negative_loss(
                        image_features, text_features, negative_features, rows, slots, logit_scale
                    )
                    for slot, kind in enumerate(self.negative_kinds):
                        if (slots == slot).any():
                            metrics[f"{name}/beats_{kind}"] = beaten[slots == slot].float().mean().item()
        return metrics

    def export(self, model: nn.Module, directory: Path) -> None:
        save_noised_clip(model, directory)
