"""UnCLIPPipeline: CLIP -> prior -> decoder -> upsamplers (DALL·E 2, Ramesh et al. 2022, figure 2).

    pipe = UnCLIPPipeline.from_pretrained("models/shapes")      # a pipeline folder (unclip.checkpoint)
    out = pipe(["a red circle above a blue square"], size=256, seed=0)
    out.images          # (B, 3, 256, 256) in [-1, 1]
    out.save("outputs/")
    pipe.variations("photo.png", n=4).save("outputs/")   # and .inpaint, .interpolate (pipeline_edits.py)

Settings: each stage has its defaults (`PriorSettings`, `DecoderSettings`, `UpsamplerSettings` in
unclip.sampling, the upsamplers' noise level from their configs), overridden by pipeline.json's "defaults" and
then by the call's arguments. A call resolves them once into a `GenerateSettings`, which the samplers read and
the PNG metadata records.

Seeds: image i of a call with seed s draws its noise from its own generator seeded s + i (with candidates c,
candidate j of prompt i from s + i·c + j), so an image does not depend on the batch it was made in, and the
deterministic samplers (DPM-Solver++, DDIM with eta 0) reproduce it exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unclip.checkpoint import fingerprint, load_model, read_pipeline_index
from unclip.clip import ClipAdapter, TextEmbedding
from unclip.diffusion import GaussianDiffusion
from unclip.diffusion.samplers import randn
from unclip.lora import load_adapter, merge_adapters
from unclip.nets.unet import UNet
from unclip.noised_clip import NoisedClip, load_noised_clip
from unclip.outputs import PipelineOutput
from unclip.pipeline_edits import PipelineEdits
from unclip.sampling import (
    DecoderSettings,
    PriorSettings,
    SettingError,
    StageSettings,
    UpsamplerSettings,
    check_count,
    check_pruning,
    format_pruning,
    sample_decoder,
    sample_prior,
    sample_upsampler,
)
from unclip.sampling_ar import ARPriorSettings, is_autoregressive, sample_ar_prior

DEFAULT_PIPELINE = str(Path(__file__).resolve().parent.parent / "models" / "shapes")  # the bundled model
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Stage:
    """One diffusion stage: its network, its diffusion process and its default sampling settings."""

    model: torch.nn.Module
    diffusion: GaussianDiffusion
    defaults: StageSettings
    folder: str

    @classmethod
    def load(
        cls,
        root: Path,
        folder: str,
        kind: type[StageSettings],
        saved: Mapping | None,
        device,
        dtype,
        adapter: Mapping | None = None,
    ) -> Stage:
        """Load the stage in `root / folder`, with a LoRA adapter ({"folder", "weight"}) merged into it if given."""
        loaded = load_model(root / folder, device=device, dtype=dtype)
        model = loaded.model
        if adapter is not None:
            load_adapter(model, root / adapter["folder"], weight=adapter["weight"]).to(device=device, dtype=dtype)
            merge_adapters(model).eval()
        if isinstance(model, UNet):  # image stages: NHWC convolutions sample faster (1.9x at 256 px on CPU)
            model.config.channels_last = True
            model.to(memory_format=torch.channels_last)
        if kind is PriorSettings and is_autoregressive(model):  # its own settings: no sampler or steps
            kind = ARPriorSettings
        defaults = kind()
        if kind is UpsamplerSettings:
            defaults = defaults.replace({"noise_level": model.config.sample_noise_level}, folder)
        defaults = defaults.replace(saved or {}, f"{root / 'pipeline.json'}: defaults.{folder}")
        return cls(model, GaussianDiffusion.from_config(loaded.diffusion), defaults, folder)

    def settings(self, overrides: Mapping[str, Any] | StageSettings | None):
        """The defaults with `overrides` (a dict, whose None values are left out, or a settings object)."""
        return self.defaults.replace(overrides, self.folder)


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """Everything a text-to-image call samples with, resolved once."""

    size: int
    seed: int
    candidates: int  # images made per prompt; the pipeline's CLIP keeps the best
    use_prior: bool
    decoder: DecoderSettings
    prior: PriorSettings | None = None  # None: the prior is not used
    upsamplers: dict[str, UpsamplerSettings] = dataclasses.field(default_factory=dict)  # those run to reach size
    dtype: str = "fp32"
    image_embeds: str | None = None  # "given" when the caller passed the image embeddings
    # > 0: rank the candidates by previews of this many decoder steps from their starting noise, then sample
    # only the kept one at the decoder's steps; 0: sample every candidate in full
    preview_steps: int = 0
    # ((step, keep), ...): after decoder step `step`, each prompt's candidates go on only for its best `keep` by
    # the CLIP score of their x0 predictions; () samples every candidate in full. Previews, if set, rank instead.
    pruning: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        check_count("seed", self.seed, 0)
        check_count("candidates", self.candidates)
        check_count("preview_steps", self.preview_steps, 0)
        object.__setattr__(self, "pruning", check_pruning(self.pruning))

    @property
    def pruning_used(self) -> tuple[tuple[int, int], ...]:
        """The stages of `pruning` that drop candidates in this call: before the decoder's last step, keeping
        fewer than `candidates`; none with previews, which rank instead."""
        if self.preview_steps or self.candidates < 2:
            return ()
        return tuple(
            (step, keep) for step, keep in self.pruning if step < self.decoder.steps and keep < self.candidates
        )

    def metadata(self) -> dict[str, Any]:
        """The settings as the PNG metadata records them."""
        meta = {k: getattr(self, k) for k in ("size", "seed", "candidates", "use_prior", "dtype")}
        if self.preview_steps and self.candidates > 1:
            meta["preview_steps"] = self.preview_steps
        if self.pruning_used:
            meta["pruning"] = format_pruning(self.pruning_used)
        if self.prior is not None:
            meta["prior"] = self.prior.kwargs()
        meta["decoder"] = self.decoder.kwargs()
        meta.update({name: s.kwargs() for name, s in self.upsamplers.items()})
        if self.image_embeds:
            meta["image_embeds"] = self.image_embeds
        return meta


class UnCLIPPipeline(PipelineEdits):
    def __init__(
        self,
        clip: ClipAdapter,
        prior: Stage | None,
        decoder: Stage,
        upsamplers: list[Stage] = (),
        inpaint: Stage | None = None,
        *,
        noised_clip: NoisedClip | None = None,
        candidates: int = 1,
        preview_steps: int = 0,
        pruning: str | tuple[tuple[int, int], ...] = (),
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.clip, self.prior, self.decoder, self.inpaint_stage = clip, prior, decoder, inpaint
        self.upsamplers = list(upsamplers)
        # GLIDE's noise-aware CLIP, whose gradient the decoder's clip_guidance_scale follows (None: none here)
        self.noised_clip = check_noised_clip(noised_clip, decoder)
        self.candidates = check_count("candidates", candidates)  # the text-to-image call's default reranking
        self.preview_steps = check_count("preview_steps", preview_steps, 0)  # and how it ranks (GenerateSettings)
        self.pruning = check_pruning(pruning)
        self.device, self.dtype = torch.device(device), dtype
        # called after every sampler step with {"stage", "step", "steps", "images"}: a progress display
        self.progress: Callable[[dict[str, Any]], None] | None = None
        self.adapters: dict[str, dict[str, Any]] = {}  # pipeline.json's LoRA adapters, merged into their stages

    # -- loading -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32"
    ) -> UnCLIPPipeline:
        """Load the pipeline folder at `path` (see unclip.checkpoint) onto `device` in `dtype`; a diffusers
        UnCLIPPipeline folder (Karlo) loads through unclip.diffusers_format."""
        root = Path(path)
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if (root / "model_index.json").is_file() and not (root / "pipeline.json").is_file():
            from unclip.diffusers_format import load_karlo  # diffusers and transformers: an optional extra

            return cls(**load_karlo(root, device=device, dtype=dtype), device=device, dtype=dtype)
        index = read_pipeline_index(root)
        saved = index["defaults"]  # per-stage settings that override the toolkit's defaults

        def stage(folder: str, kind: type[StageSettings], key: str | None = None, role: str | None = None) -> Stage:
            adapter = index["adapters"].get(role or folder)  # LoRA adapters, by stage
            return Stage.load(root, folder, kind, saved.get(key or folder), device, dtype, adapter)

        clip = ClipAdapter.from_checkpoint(root / index["clip"], device=device)
        noised = load_noised_clip(root / index["noised_clip"], device=device) if index.get("noised_clip") else None
        prior = stage(index["prior"], PriorSettings, "prior", "prior") if index.get("prior") else None
        decoder = stage(index["decoder"], DecoderSettings, "decoder", "decoder")
        upsamplers = [stage(name, UpsamplerSettings) for name in index["upsamplers"]]
        inpaint = stage(index["inpaint"], DecoderSettings, "decoder", "inpaint") if index.get("inpaint") else None
        try:
            candidates = check_count("candidates", saved.get("candidates", 1))
            preview_steps = check_count("preview_steps", saved.get("preview_steps", 0), 0)
            pruning = check_pruning(saved.get("pruning"))
        except SettingError as e:
            raise ValueError(f"{root / 'pipeline.json'}: defaults.{e}") from None
        ranking = {"candidates": candidates, "preview_steps": preview_steps, "pruning": pruning}
        pipe = cls(
            clip, prior, decoder, upsamplers, inpaint, noised_clip=noised, **ranking, device=device, dtype=dtype
        )
        pipe.adapters = {name: dict(adapter) for name, adapter in index["adapters"].items()}
        return pipe

    def fingerprint(self) -> str:
        """A hash of what this pipeline samples with: every network's weights and every stage's default settings
        (`unclip.checkpoint.fingerprint`), not the folder it was loaded from: a copy has the same one."""
        stages = [s for s in (self.prior, self.decoder, *self.upsamplers, self.inpaint_stage) if s is not None]
        parts: list[Any] = [{"candidates": self.candidates, "preview_steps": self.preview_steps}]
        if self.pruning:  # left out when unset, so that a pipeline without it keeps its fingerprint
            parts.append({"pruning": format_pruning(self.pruning)})
        for s in stages:
            d = s.diffusion
            settings = {"folder": s.folder, "defaults": s.defaults.kwargs(), "prediction": d.prediction}
            parts += [s.model, d.betas, {**settings, "learned_variance": d.learned_variance}]
        if self.noised_clip is not None:
            parts.append(self.noised_clip)
        return fingerprint(self.clip.fingerprint(), *parts)

    @property
    def sizes(self) -> list[int]:
        """The output sizes this pipeline can stop at: the decoder's, then each upsampler's."""
        return [self.decoder.model.config.image_size] + [s.model.config.image_size for s in self.upsamplers]

    def check_size(self, size: int | None) -> int:
        """`size`, or the decoder's size for None; a ValueError for a size this pipeline does not make."""
        size = size or self.sizes[0]
        if size not in self.sizes:
            raise ValueError(f"size {size} is not one this pipeline makes; choose one of {self.sizes}")
        return size

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def generators(self, seed: int, n: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed + i) for i in range(n)]

    def noise(self, shape: tuple[int, ...], generators: list[torch.Generator]) -> Tensor:
        """(B, ...) standard normal noise, row i from generators[i] (drawn on the CPU, then moved)."""
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

    # -- the stages ----------------------------------------------------------------------------------------

    def encode_text(self, prompts: str | list[str]) -> TextEmbedding:
        return self.clip.embed_text(check_prompts(prompts), normalize=True)

    def prior_embeds(self, text: TextEmbedding, generators, settings: PriorSettings | Mapping | None = None):
        """1. prior: CLIP text embeddings -> CLIP image embeddings, one generator per prompt."""
        if self.prior is None:
            raise ValueError("this pipeline has no prior; generate with use_prior=False or add a prior/ folder")
        tokens = (text.tokens, text.mask) if self.prior.model.config.text_width else (None, None)
        model, diffusion, kwargs = self.prior.model, self.prior.diffusion, self.prior.settings(settings).kwargs()
        callback = self.step_callback("prior", len(text.embed))
        if is_autoregressive(model):
            with self.autocast():
                return sample_ar_prior(model, text.embed, *tokens, generator=generators, callback=callback, **kwargs)
        with self.autocast():
            return sample_prior(
                model, diffusion, text.embed, *tokens, generator=generators, callback=callback, **kwargs
            )

    def decode(
        self, image_embed, text, generators, settings=None, *, x_T=None, inpaint=None, prompts=None, prune=None
    ) -> Tensor:
        """2. decoder: CLIP image embeddings (+ caption tokens, or `text` None) -> images at the decoder's size.
        With `inpaint` ({"image", "mask"}), the pipeline's inpainting decoder if it has one. `prompts`, one per
        image, are what CLIP guidance (the settings' clip_guidance_scale) steers toward. `prune(i, x0)` may drop
        rows after step i (unclip.diffusion.samplers); the images of the rows kept are returned."""
        stage = self.inpaint_stage if (inpaint is not None and self.inpaint_stage is not None) else self.decoder
        tokens = (None, None, None) if text is None else (text.tokens, text.mask, text.words)
        kwargs = stage.settings(settings).kwargs()
        guide = self.clip_guide(prompts, kwargs["clip_guidance_scale"])
        if prune is not None and guide is not None:
            rank = prune

            def prune(i, x0):  # CLIP guidance follows the rows that go on
                keep = rank(i, x0)
                if keep is not None:
                    guide.select(keep)
                return keep

        with self.autocast():
            return sample_decoder(
                stage.model,
                stage.diffusion,
                image_embed,
                *tokens[:2],
                text_words=tokens[2],
                x_T=x_T,
                inpaint=inpaint,
                generator=generators,
                callback=self.step_callback("decoder"),
                clip_guide=guide,
                prune=prune,
                **kwargs,
            ).float()

    def upsample(
        self,
        images: Tensor,
        size: int,
        generators,
        settings: Mapping | None = None,
        known: Callable[[int], dict[str, Tensor]] | None = None,
        image_embeds: Tensor | None = None,
    ) -> Tensor:
        """3. upsamplers: 64 -> 256 (-> 1024), stopping at `size`; `settings` maps folder -> overrides.

        image_embeds: (B, D) the CLIP image embeddings the images were decoded from, which upsamplers conditioned
            on them (`model.clip_dim`) read.

        known: for edits, size -> {"image": (1, 3, size, size), "mask": (1, 1, size, size), 1 = repaint}: each
            upsampler keeps the known image outside the mask at its output size (`sample_upsampler`'s inpaint).
        """
        size = self.check_size(size)
        for stage in self.upsamplers:
            if images.shape[-1] >= size:
                break
            kwargs = stage.settings((settings or {}).get(stage.folder)).kwargs()
            config = stage.model.config
            inpaint = known(images.shape[-1] * config.image_size // config.low_res_size) if known else None
            outs = []
            for i, g in enumerate(generators):  # per image, so each image keeps its own random stream
                callback = self.step_callback(f"{stage.folder} (image {i + 1} of {len(generators)})")
                with self.autocast():
                    out = sample_upsampler(
                        stage.model,
                        stage.diffusion,
                        images[i : i + 1],
                        image_embed=None if image_embeds is None else image_embeds[i : i + 1],
                        generator=g,
                        inpaint=inpaint,
                        callback=callback,
                        **kwargs,
                    )
                outs.append(out)
            images = torch.cat(outs).float()
        return images

    def step_callback(self, stage: str, images: int | None = None) -> Callable[[dict], None] | None:
        """The sampler callback that reports a stage's steps to `self.progress` (None without one), with `images`,
        or else the images each step sampled (fewer after candidates are pruned)."""
        if self.progress is None:
            return None
        report = self.progress
        return lambda info: report(
            {"stage": stage, "step": info["i"] + 1, "steps": info["steps"], "images": images or len(info["x"])}
        )

    def clip_guide(self, prompts: list[str] | None, scale: float):
        """The noise-aware CLIP's gradient toward each prompt, for CLIP guidance at `scale` (None at 0)."""
        if not scale:
            return None
        check_clip_guidance(self.noised_clip, scale)
        if prompts is None:
            raise ValueError(
                "CLIP guidance steers the decoder toward a caption and this edit has none: set the decoder's "
                "clip_guidance_scale to 0"
            )
        return self.noised_clip.guide(list(prompts))

    def clip_scores(self, images: Tensor, text_embeds: Tensor) -> Tensor:
        """(B,) cosine similarity of each image's CLIP embedding with its (normalised) text embedding."""
        image_embed = self.clip.embed_image(images.to(self.device), normalize=True).float()
        return (image_embed * text_embeds.float()).sum(-1)

    # -- text to image ---------------------------------------------------------------------------------------

    def resolve(
        self,
        *,
        size: int | None = None,
        seed: int = 0,
        candidates: int | None = None,
        preview_steps: int | None = None,
        pruning: str | tuple[tuple[int, int], ...] | None = None,
        use_prior: bool = True,
        prior: Mapping | PriorSettings | None = None,
        decoder: Mapping | DecoderSettings | None = None,
        upsamplers: Mapping[str, Mapping | UpsamplerSettings] | None = None,
        image_embeds_given: bool = False,
    ) -> GenerateSettings:
        """The settings of a text-to-image call: the pipeline's defaults with the given overrides, checked."""
        size = self.check_size(size)
        unknown = sorted(set(upsamplers or {}) - {s.folder for s in self.upsamplers})
        if unknown:
            raise ValueError(f"unknown upsamplers {unknown}; this pipeline has {[s.folder for s in self.upsamplers]}")
        use_prior = use_prior and not image_embeds_given
        check_clip_guidance(self.noised_clip, self.decoder.settings(decoder).clip_guidance_scale)
        if use_prior and self.prior is None:
            raise ValueError("this pipeline has no prior; generate with use_prior=False or add a prior/ folder")
        return GenerateSettings(
            size=size,
            seed=seed,
            candidates=self.candidates if candidates is None else candidates,
            preview_steps=self.preview_steps if preview_steps is None else preview_steps,
            pruning=self.pruning if pruning is None else pruning,
            use_prior=use_prior,
            decoder=self.decoder.settings(decoder),
            prior=self.prior.settings(prior) if use_prior else None,
            upsamplers={
                s.folder: s.settings((upsamplers or {}).get(s.folder))
                for s in self.upsamplers
                if s.model.config.low_res_size < size
            },
            dtype=str(self.dtype).removeprefix("torch."),
            image_embeds="given" if image_embeds_given else None,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str],
        *,
        batch_size: int | None = None,
        image_embeds: Tensor | None = None,
        **settings,
    ) -> PipelineOutput:
        """Generate one image per prompt.

        Args:
            prompts: B prompts (repeat a prompt for several images of it).
            batch_size: prompts per batch (all at once by default); it does not change the images.
            image_embeds: (B, D) CLIP image embeddings to decode instead of the prior's (e.g. those of real
                images of the prompts: the decoder's accuracy under a perfect prior); the prompts still give
                the decoder its caption tokens. With candidates, each is decoded that many times.
            **settings: `resolve`'s arguments:
                size: 64, 256 or 1024 (what the pipeline has); default its decoder's size.
                seed: image i uses seed + i.
                candidates: make this many images per prompt and keep the one whose CLIP image embedding is
                    most similar to the prompt's text embedding (DALL·E's reranking; Ramesh et al. 2021, §2.5);
                    default the pipeline's ("candidates" in pipeline.json's defaults, else 1). Candidates are
                    scored at the decoder's size, so only the kept images go through the upsamplers.
                preview_steps: rank the candidates by previews of this many decoder steps from each one's
                    starting noise, and sample only the kept one in full: with a deterministic sampler, the image
                    the kept candidate would have been, at a fraction of the cost. Default the pipeline's
                    ("preview_steps" in pipeline.json's defaults, else 0: every candidate in full).
                pruning: "STEP:KEEP,..." (or its pairs): after decoder step STEP, only each prompt's best KEEP
                    candidates by the CLIP score of their x0 predictions go on; the last of them left at the end
                    are reranked as usual. The kept image is the one the full sampling of that candidate makes.
                    Default the pipeline's ("pruning" in pipeline.json's defaults); "none" samples all in full.
                    Previews (preview_steps > 0) rank instead when both are set.
                use_prior: False decodes the raw text embedding (DALL·E 2's ablation, §5.1).
                prior, decoder: overrides of the stage's settings, as a dict (None values are left out) or a
                    settings object; upsamplers: {folder name: overrides}.
        """
        prompts = check_prompts(prompts)
        batches = self.batches(prompts, batch_size=batch_size or len(prompts), image_embeds=image_embeds, **settings)
        return PipelineOutput.concat([out for _, out in batches])

    def batches(
        self,
        prompts: list[str],
        *,
        batch_size: int,
        skip: frozenset[int] | set[int] = frozenset(),
        image_embeds: Tensor | None = None,
        **settings,
    ) -> Iterator[tuple[int, PipelineOutput]]:
        """(start, output) for each batch prompts[start : start + batch_size] whose start is not in `skip`, with
        the seeds one whole call would give its images: a run can stream its outputs and resume."""
        prompts = check_prompts(prompts)
        check_count("batch_size", batch_size)
        if image_embeds is not None and image_embeds.shape != (len(prompts), self.clip.embed_dim):
            raise ValueError(
                f"image_embeds must have shape ({len(prompts)}, {self.clip.embed_dim}) for {len(prompts)} "
                f"prompts and this pipeline's CLIP, got {tuple(image_embeds.shape)}"
            )
        call = self.resolve(**settings, image_embeds_given=image_embeds is not None)
        for start in range(0, len(prompts), batch_size):
            if start in skip:
                continue
            given = None if image_embeds is None else image_embeds[start : start + batch_size]
            yield start, self._generate(prompts[start : start + batch_size], start, call, given)

    def _generate(self, prompts: list[str], start: int, call: GenerateSettings, given: Tensor | None):
        """Stages 1-3 for prompts[start:...] of a call: `call.candidates` per prompt, the best kept, upsampled."""
        c = call.candidates
        many = [p for p in prompts for _ in range(c)]
        seeds = list(range(call.seed + start * c, call.seed + (start + len(prompts)) * c))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        text = self.encode_text(many)
        if given is not None:
            image_embed = given.repeat_interleave(c, dim=0).to(self.device, text.embed.dtype)
        elif call.use_prior:
            image_embed = self.prior_embeds(text, generators, call.prior)
        else:
            image_embed = text.embed
        if c > 1 and call.preview_steps:
            return self._generate_from_previews(many, seeds, text, image_embed, generators, call)
        if call.pruning_used:
            return self._generate_pruned(many, seeds, text, image_embed, generators, call)
        images = self.decode(image_embed, text, generators, call.decoder, prompts=many)
        out = PipelineOutput(images, image_embed, text.embed, many, seeds, call.metadata())
        if c > 1:
            out, keep = self._rerank(out, c)
            generators = [generators[i] for i in keep]
        out.images = self.upsample(out.images, call.size, generators, call.upsamplers, image_embeds=out.image_embeds)
        return out

    def _generate_from_previews(self, many, seeds, text: TextEmbedding, image_embed: Tensor, generators, call):
        """Rank each prompt's candidates by `call.preview_steps`-step previews from their starting noise x_T, then
        sample the kept ones from the same x_T at the decoder's settings, and upsample them."""
        s = self.sizes[0]
        shape = (len(generators), self.decoder.model.config.out_channels, s, s)
        x_T = randn(shape, generator=generators, device=self.device)
        previewers = [copy_generator(g) for g in generators]  # a stochastic sampler leaves `generators` as they are
        preview = dataclasses.replace(call.decoder, steps=call.preview_steps)
        previews = self.decode(image_embed, text, previewers, preview, x_T=x_T, prompts=many)
        out = PipelineOutput(previews, image_embed, text.embed, many, seeds, call.metadata())
        out, keep = self._rerank(out, call.candidates)
        kept = TextEmbedding(*(field[keep] for field in text))
        generators = [generators[i] for i in keep]
        kept_prompts = [many[i] for i in keep]
        out.images = self.decode(
            image_embed[keep], kept, generators, call.decoder, x_T=x_T[keep], prompts=kept_prompts
        )
        out.images = self.upsample(out.images, call.size, generators, call.upsamplers, image_embeds=out.image_embeds)
        return out

    def _generate_pruned(self, many, seeds, text: TextEmbedding, image_embed: Tensor, generators, call):
        """Sample every candidate, dropping all but each prompt's best `keep` at each stage of the call's pruning (by
        the CLIP score of their x0 predictions), rerank those left at the end as usual, and upsample the kept."""
        c = call.candidates
        B = len(many) // c
        alive = torch.arange(len(many)).view(B, c)  # each prompt's candidates still sampled, in batch order
        schedule = dict(call.pruning_used)

        def prune(i: int, x0: Tensor) -> Tensor | None:
            nonlocal alive
            k, keep = alive.shape[1], schedule.get(i + 1)
            if keep is None or keep >= k:
                return None
            embeds = text.embed[alive.flatten().to(text.embed.device)]
            scores = self.clip_scores(x0.float().clamp(-1, 1), embeds).view(B, k).cpu()
            top = scores.topk(keep, dim=1).indices.sort(dim=1).values
            alive = alive.gather(1, top)
            return (top + torch.arange(B)[:, None] * k).flatten()

        images = self.decode(image_embed, text, generators, call.decoder, prompts=many, prune=prune)
        rows = alive.flatten().tolist()
        out = PipelineOutput(
            images,
            image_embed[rows],
            text.embed[rows],
            [many[r] for r in rows],
            [seeds[r] for r in rows],
            call.metadata(),
        )
        out, keep = self._rerank(out, alive.shape[1])
        out.candidate_images = out.candidate_scores = None  # the candidates that ran to the end are not all
        generators = [generators[rows[i]] for i in keep]
        out.images = self.upsample(out.images, call.size, generators, call.upsamplers, image_embeds=out.image_embeds)
        return out

    def _rerank(self, out: PipelineOutput, c: int) -> tuple[PipelineOutput, list[int]]:
        """Keep each prompt's candidate whose image the pipeline's CLIP finds closest to the prompt (scored at the
        decoder's size, so that only the kept images are upsampled); also the kept rows' indices."""
        B = len(out.prompts) // c
        scores = self.clip_scores(out.images, out.text_embeds).view(B, c)
        best = (scores.argmax(dim=1) + torch.arange(B, device=scores.device) * c).tolist()
        return PipelineOutput(
            out.images[best],
            out.image_embeds[best],
            out.text_embeds[best],
            [out.prompts[i] for i in best],
            [out.seeds[i] for i in best],
            out.settings,
            scores.max(dim=1).values.tolist(),
            out.images.view(B, c, *out.images.shape[1:]),
            scores,
        ), best


def check_noised_clip(noised_clip: NoisedClip | None, decoder: Stage) -> NoisedClip | None:
    """`noised_clip`, when it was trained on the decoder's noise schedule; a ValueError otherwise."""
    if noised_clip is None:
        return None
    ours = GaussianDiffusion.from_config(noised_clip.diffusion).alphas_cumprod
    theirs = decoder.diffusion.alphas_cumprod
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs):
        raise ValueError(
            "the noise-aware CLIP was trained on another noise schedule than the decoder's "
            f"({noised_clip.diffusion.schedule}, {noised_clip.num_timesteps} steps): train it with the decoder's "
            "diffusion section"
        )
    return noised_clip


def check_clip_guidance(noised_clip: NoisedClip | None, scale: float) -> None:
    if scale and noised_clip is None:
        raise ValueError(
            f"CLIP guidance (decoder clip_guidance_scale={scale:g}, --clip-guidance) needs a noise-aware CLIP and "
            "this pipeline has none: train one (configs/clip/shapes_noised.yaml) and add it with train/pipeline.py "
            "--noised-clip FOLDER, or leave CLIP guidance at 0"
        )


def copy_generator(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(generator.device)
    copy.set_state(generator.get_state())
    return copy


def check_prompts(prompts: str | list[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"empty prompt {p!r}: describe the image to generate, e.g. 'a red circle'")
    return prompts
