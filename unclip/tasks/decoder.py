"""Training task for the 64 px decoder (CLIP image embedding + caption -> image) and its inpainting variant.

The decoder is trained on image-caption data, with CLIP image and text embeddings computed on the fly by a
frozen CLIP (DALL·E 2 §2.1: the image embedding is added to the timestep embedding and projected into 4 extra
tokens; GLIDE: the caption's token encodings are extra keys and values in every attention layer). The network
drops the image embedding (10%) and the text (50%) itself in training, for classifier-free guidance.

With `train.distill` the task trains a student of fewer sampling steps instead (progressive distillation,
unclip.diffusion.distill): a frozen copy of the teacher (`train.distill.teacher`, else `train.init_from`) makes
the targets, and the student, started from `train.init_from`, sees the same conditioning without dropout.

`kind: inpaint` trains GLIDE's inpainting model: the decoder with the masked image and the mask as extra
input channels, fine-tuned from a trained decoder (`train.init_from`) on random masks (1 = repaint, white in a
user's mask image): rectangles and brush strokes, and, on data that knows where its objects are (shapes), one
object's box with a margin, or the whole image (`training_masks`). The caption stays the whole image's, so the
model learns to fill the mask so that the whole image fits the caption (GLIDE's convention).

At every evaluation the task writes a grid of EMA samples for a fixed set of validation captions, next to
the real images: runs/NAME/samples/step_XXXXXXX.png.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from unclip.checkpoint import load_model, save_model
from unclip.config import RunConfig
from unclip.data import build_dataset, collate
from unclip.data.embeddings import encode_batch
from unclip.data.shapes import ShapeObject, box_mask
from unclip.diffusion import GaussianDiffusion
from unclip.diffusion.distill import distillation_loss
from unclip.imageio import save_grid
from unclip.lora import preserving_step
from unclip.nets.inpaint import InpaintUNet
from unclip.nets.unet import UNet
from unclip.sampling import decoder_cond, sample_decoder
from unclip.tasks.conditioning import check_clip_dims, load_clip

GRID_SIZE = 8  # validation captions in the sample grid


def random_inpaint_mask(batch: int, size: int | tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """GLIDE-style training masks: random rectangles and brush strokes, sometimes inverted (outpainting).

    Each mask gets 1-2 rectangles (each side 10-50% of the image's) and/or 1-2 brush strokes (polylines of 2-5
    vertices, 8-24% of the image's side wide); one in ten is inverted instead, so that everything around a kept
    rectangle is repainted (outpainting). Every mask has both values.

    Args:
        batch: number of masks.
        size: H or (H, W).
        generator: a CPU torch.Generator for reproducible masks.

    Returns:
        (batch, 1, H, W) float32 on the CPU, 1 = repaint, 0 = keep.
    """
    H, W = (size, size) if isinstance(size, int) else size
    ys = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W)
    xs = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W)
    pixels = torch.stack([ys, xs], dim=-1)  # (H, W, 2)
    masks = torch.zeros(batch, 1, H, W)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    def randint(lo: int, hi: int) -> int:  # lo..hi inclusive
        return int(torch.randint(lo, hi + 1, (), generator=generator))

    def rectangle() -> Tensor:
        h, w = max(1, round(uniform(0.1, 0.5) * H)), max(1, round(uniform(0.1, 0.5) * W))
        y, x = randint(0, H - h), randint(0, W - w)
        return (ys >= y) & (ys < y + h) & (xs >= x) & (xs < x + w)

    def stroke() -> Tensor:
        scale = torch.tensor([H - 1, W - 1], dtype=torch.float32)
        points = torch.rand(randint(2, 5), 2, generator=generator) * scale
        radius = max(1.0, uniform(0.02, 0.06) * (H + W))  # >= 1 px, so that a stroke always hits a pixel
        hit = torch.zeros(H, W, dtype=torch.bool)
        for a, b in zip(points[:-1], points[1:], strict=True):
            ab = b - a
            s = ((pixels - a) @ ab / ab.dot(ab).clamp_min(1e-6)).clamp(0, 1)  # projection onto the segment
            hit |= (pixels - a - s[..., None] * ab).norm(dim=-1) <= radius
        return hit

    for i in range(batch):
        kind = randint(0, 9)
        if kind == 0:  # outpainting: keep one rectangle, repaint the rest
            masks[i, 0] = (~rectangle()).float()
        else:
            rectangles = randint(1, 2) if kind % 3 != 1 else 0  # kind % 3: 0 both, 1 strokes, 2 rectangles
            strokes = randint(1, 2) if kind % 3 != 2 else 0
            for shape in [rectangle] * rectangles + [stroke] * strokes:
                masks[i, 0] += shape().float()
        masks[i].clamp_(0, 1)
        if masks[i].min() == 1:  # fully covered (rare): keep a rectangle
            masks[i, 0] *= (~rectangle()).float()
    return masks


OBJECT_BOX_PROB = 0.4  # of training masks: one object's box, with a margin (scenes that list their objects)
WHOLE_IMAGE_PROB = 0.05  # the whole image: the plain decoder's task


def training_masks(scenes: list[dict], size: int, generator: torch.Generator | None = None) -> Tensor:
    """The inpainting model's training masks, (B, 1, size, size), 1 = repaint.

    With scenes (shapes' `Scene.to_dict()` per item): OBJECT_BOX_PROB of them cover one random object's box
    with a margin of 0-8% of the side, WHOLE_IMAGE_PROB cover everything, the rest are `random_inpaint_mask`'s
    rectangles and strokes. Items without objects (an empty dict: data that does not list them) get the whole
    image or a random mask.
    """
    masks = random_inpaint_mask(len(scenes), size, generator)
    for i, scene in enumerate(scenes):
        u = torch.rand((), generator=generator).item()
        objects = scene.get("objects") if isinstance(scene, dict) else None
        if u < WHOLE_IMAGE_PROB:
            masks[i] = 1
        elif u < WHOLE_IMAGE_PROB + OBJECT_BOX_PROB and objects:
            k = int(torch.randint(len(objects), (), generator=generator))
            o = objects[k]
            margin = 0.08 * torch.rand((), generator=generator).item()
            masks[i, 0] = torch.from_numpy(box_mask(ShapeObject(**o).box, size, margin)).float()
    return masks


class DecoderTask:
    def __init__(self, config: RunConfig, clip=None):
        self.config, self.kind = config, config.kind
        # an inpainting model's init_from is a decoder whose first layer _build_model widens; a decoder's is loaded
        # by the Trainer (unclip.training.init_weights), which checks it and names the tensors it lacks
        self.handles_init_from = self.kind == "inpaint"
        model_config = config.model
        model_config.gradient_checkpointing = config.train.gradient_checkpointing
        if config.data.image_size != model_config.image_size:
            raise ValueError(
                f"data.image_size ({config.data.image_size}) must equal model.image_size ({model_config.image_size})"
            )
        if config.diffusion.learned_variance != model_config.learned_variance:
            raise ValueError("model.learned_variance and diffusion.learned_variance must agree")
        self.clip = clip if clip is not None else load_clip(config.clip)
        check_clip_dims(
            self.clip,
            clip_dim=model_config.clip_dim,
            text_width=model_config.text_width,
            text_ctx=model_config.text_ctx,
        )
        self.model = self._build_model()
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)
        self.distill, self.teacher = config.train.distill, None
        if self.distill:
            self.teacher = self._load_teacher(self.distill.teacher or config.train.init_from)
        self.train_dataset = build_dataset(config.data, split="train")
        self.val_dataset = build_dataset(config.data, split="val")
        self.collate_fn = collate
        self.device = torch.device("cpu")

    def _build_model(self) -> UNet:
        if self.kind == "decoder":
            return UNet(self.config.model)
        init_from = self.config.train.init_from
        if not init_from:
            return InpaintUNet(self.config.model)
        source = load_model(init_from).model
        if isinstance(source, InpaintUNet):
            return source.train()
        if type(source) is not UNet:
            raise ValueError(f"train.init_from={init_from} holds a {type(source).__name__}, not a decoder UNet")
        model = InpaintUNet.from_unet(source)
        self.config.model = model.config  # the architecture written into the export
        return model

    def _load_teacher(self, path: str) -> UNet:
        loaded = load_model(path)
        teacher = loaded.model
        if type(teacher) is not UNet:
            raise ValueError(f"train.distill: {path} holds a {type(teacher).__name__}, not a decoder UNet")
        if teacher.config.image_size != self.config.model.image_size:
            raise ValueError(
                f"train.distill: the teacher {path} draws {teacher.config.image_size} px, the student "
                f"{self.config.model.image_size} px"
            )
        ours, theirs = self.config.diffusion, loaded.diffusion
        for name in ("schedule", "timesteps", "betas", "prediction", "learned_variance"):
            if getattr(ours, name) != getattr(theirs, name):
                raise ValueError(
                    f"train.distill: the teacher {path} was trained with diffusion.{name}={getattr(theirs, name)!r}, "
                    f"this run has {getattr(ours, name)!r}; copy the teacher's diffusion section from its config.json"
                )
        return teacher.eval().requires_grad_(False)

    def setup(self, device: torch.device) -> None:
        self.device = device
        self.clip.to(device)
        if self.teacher is not None:
            self.teacher.to(device)

    def _inputs(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        c = encode_batch(self.clip, batch, self.device)
        x_0 = batch["image"].to(self.device)
        cond = decoder_cond(
            c["image_embed"], c["text_tokens"], c["text_mask"], self.model.config, text_words=c["text_words"]
        )
        if self.kind == "inpaint":
            scenes = batch.get("scene", [{}] * x_0.shape[0])
            mask = training_masks(scenes, x_0.shape[-1]).to(self.device)
            cond.update(inpaint_image=x_0, inpaint_mask=mask)
        return x_0, cond

    def _distill_loss(self, model, x_0, cond, **fixed) -> Tensor:
        """Per row; `fixed` may pin the student steps (`index`) and the `noise`, as validation does."""
        cond = {**cond, "cond_drop": torch.zeros(x_0.shape[0], dtype=torch.bool, device=x_0.device)}
        threshold = getattr(self.model.config, "threshold", "dynamic")  # as sample_decoder will clip the student
        return distillation_loss(
            model, self.teacher, self.diffusion, x_0, self.distill.steps, cond=cond, threshold=threshold, **fixed
        )

    def loss(self, model, batch) -> tuple[Tensor, dict[str, float]]:
        x_0, cond = self._inputs(batch)
        if self.distill:
            return self._distill_loss(model, x_0, cond).mean(), {}
        lora = self.config.train.lora
        if lora and lora.preserve:
            return preserving_step(lora, self.diffusion, model, x_0, cond, batch["caption"])
        terms = self.diffusion.training_loss(model, x_0, cond=cond)
        logs = {"vlb": terms["vlb"].mean().item()} if "vlb" in terms else {}
        return terms["loss"].mean(), logs

    def _val_batch(self):
        n = min(self.config.data.val_size, len(self.val_dataset))
        return next(iter(DataLoader(Subset(self.val_dataset, range(n)), batch_size=n, collate_fn=collate)))

    @torch.no_grad()
    def evaluate(self, model, ema_model) -> dict[str, float]:
        """Validation loss at fixed timesteps and noise, for the online and the EMA network."""
        state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the inpainting masks
        x_0, cond = self._inputs(self._val_batch())
        gen = torch.Generator().manual_seed(0)
        t = torch.randint(0, self.diffusion.num_timesteps, (x_0.shape[0],), generator=gen).to(x_0.device)
        noise = torch.randn(x_0.shape, generator=gen).to(x_0.device)
        if self.distill:  # every student step in turn, the same for both networks
            index = torch.arange(x_0.shape[0], device=x_0.device) % self.distill.steps
        metrics = {}
        for name, net in (("val", model), ("val_ema", ema_model)):
            if self.distill:
                loss = self._distill_loss(net, x_0, cond, index=index, noise=noise).mean()
            else:
                loss = self.diffusion.training_loss(net, x_0, cond=cond, t=t, noise=noise)["loss"].mean()
            metrics[f"{name}/loss"] = loss.item()
        torch.random.set_rng_state(state)
        return metrics

    @torch.no_grad()
    def save_samples(self, ema_model, path: Path) -> None:
        """A grid: the real validation images in the first row, EMA samples for their captions below."""
        batch = self._val_batch()
        n = min(GRID_SIZE, len(batch["caption"]))
        batch = {k: v[:n] for k, v in batch.items()}
        x_0, cond = self._inputs(batch)
        inpaint = None
        if self.kind == "inpaint":
            inpaint = {"image": cond.pop("inpaint_image"), "mask": cond.pop("inpaint_mask")}
        text = {k: cond.get(k) for k in ("text_tokens", "text_mask", "text_words")}
        steps = {"sampler": "ddim", "steps": self.distill.steps, "guidance_scale": 1.0} if self.distill else {}
        samples = sample_decoder(
            ema_model,
            self.diffusion,
            cond.get("image_embed"),
            **text,
            inpaint=inpaint,
            generator=torch.Generator().manual_seed(0),
            **steps,
        )
        save_grid(torch.cat([x_0, samples]).cpu(), path, nrow=n, captions=list(batch["caption"]))

    def export(self, model, directory: Path) -> None:
        save_model(model, directory, kind=self.kind, diffusion=self.config.diffusion, clip=self.config.clip)
