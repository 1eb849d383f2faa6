"""The pipeline's image manipulations (DALL·E 2 §3): variations, inpainting, interpolations and text diffs.

    pipe.variations("photo.png", n=4).save("outputs/")
    pipe.inpaint("photo.png", "mask.png", "a red hat").save("outputs/")
    pipe.interpolate("cat.png", from_caption="a cat", to_caption="an anime cat").save("outputs/")

`PipelineEdits` is a base of `UnCLIPPipeline`: its methods compose the pipeline's public stages (`encode_text`,
`prior_embeds`, `decode`, `upsample`) with the algorithms of unclip.edits, which work on networks and tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from unclip import edits
from unclip.clip import TextEmbedding
from unclip.imageio import square_tensor
from unclip.outputs import EditOutput, slug
from unclip.sampling import check_count

Source = Image.Image | str | Path


class PipelineEdits:
    """Image-to-image methods; the attributes and stage methods they use are `UnCLIPPipeline`'s."""

    @torch.no_grad()
    def invert(
        self,
        image: Image.Image,
        image_embed: Tensor | None = None,
        *,
        steps: int = edits.INVERSION_STEPS,
        refine: int = edits.INVERSION_REFINE,
    ) -> Tensor:
        """The decoder's DDIM latent x_T (1, 3, s, s) of an image's centre square: with its L2-normalised CLIP
        embedding z_i (1, D), computed if None, the bipartite latent (z_i, x_T) of DALL·E 2 §3.1. The decoder
        is inverted conditioned on z_i and no caption (`edits.null_text`), at guidance scale 1."""
        if image_embed is None:
            image_embed = self.clip.embed_image([image], normalize=True).to(self.device)
        x_0 = square_tensor(image, self.sizes[0]).to(self.device)
        text = edits.null_text(1, self.decoder.model, self.device)
        model, diffusion = self.decoder.model, self.decoder.diffusion
        with self.autocast():
            x_T = edits.invert_decoder(model, diffusion, x_0, image_embed, text, steps=steps, refine=refine)
        return x_T.float()

    @torch.no_grad()
    def variations(
        self,
        image: Source,
        *,
        n: int = 4,
        seed: int = 0,
        invert: bool = True,
        eta: float = edits.VARIATION_ETA,
        size: int | None = None,
        decoder: dict[str, Any] | None = None,
        upsamplers: dict[str, dict[str, Any]] | None = None,
        inversion_steps: int = edits.INVERSION_STEPS,
        refine: int = edits.INVERSION_REFINE,
        candidates: int = edits.VARIATION_CANDIDATES,
    ) -> EditOutput:
        """Variations of an image: decodings of its CLIP image embedding (DALL·E 2 §3.1, figure 3).

        Args:
            image: a PIL image or an image file. n: the number of variations; each one's metadata and file name
                carry the seed of the decoding it kept, which `seed=` that seed with `candidates=1` reproduces.
            invert: decode the image's DDIM-inverted latent x_T (`invert`) with DDIM at `eta`, as the paper does:
                eta = 0 reconstructs the image, larger eta keeps less of it. False: decode fresh noise with the
                decoder's own sampler (what Karlo and diffusers do).
            decoder: overrides of the decoder's settings; with invert only "guidance_scale" (default 1, the
                model that was inverted: larger scales leave the path back to the image).
            inversion_steps, refine: DDIM inversion (and decoding) steps, and fixed-point iterations per step.
            candidates: decode each variation this many times and keep the decoding whose CLIP image embedding is
                closest to the source's (the pipeline's CLIP, at the decoder's size); variation i's candidate j
                uses seed + i·candidates + j. 1 keeps every decoding; the default is `edits.VARIATION_CANDIDATES`.
                With invert at eta 0 the decoding is deterministic, so one is made whatever this says.
        """
        size = self._check_edit(size, n, seed)
        c = check_count("candidates", candidates)
        if invert and eta == 0:
            c = 1  # DDIM at eta 0 decodes the inverted latent the same way every time
        inversion = (
            edits.inversion_settings(decoder, steps=inversion_steps, eta=eta, refine=refine) if invert else None
        )
        settings = None if invert else self.decoder.settings(decoder)
        # 1. the bipartite latent (z_i, x_T): CLIP image embedding (CLIP's own preprocessing), decoder inversion
        source, name = edits.open_source(image)
        image_embed = self.clip.embed_image([source], normalize=True).to(self.device)
        x_T = self.invert(source, image_embed, steps=inversion_steps, refine=refine) if invert else None
        # 2. decoder: DDIM at eta from x_T (or fresh noise), one generator per image; 3. upsamplers
        generators = self.generators(seed, n * c)
        embeds, x_T = image_embed.repeat(n * c, 1), None if x_T is None else x_T.repeat(n * c, 1, 1, 1)
        images = self._decode_without_text(embeds, x_T, generators, inversion or settings)
        seeds = list(range(seed, seed + n * c))
        if c > 1:  # keep the candidate CLIP finds closest to the source image
            found = self.clip.embed_image(images.to(self.device), normalize=True).float()
            scores = (found @ image_embed.float()[0]).view(n, c)
            keep = (scores.argmax(dim=1) + torch.arange(n, device=scores.device) * c).tolist()
            images, embeds = images[keep], embeds[keep]
            generators, seeds = [generators[i] for i in keep], [seeds[i] for i in keep]
        record = inversion.metadata() if invert else {**settings.kwargs(), "text": "null"}
        stem, meta = f"{slug(Path(name).stem)}_variations", {"mode": "variation", "source": name}
        fields = {"names": [f"{stem}_{k:05d}" for k in seeds], "stem": stem}
        per_image = [{"seed": k} for k in seeds]
        recorded = {"candidates": c, "decoder": record} if c > 1 else {"decoder": record}
        return self._edit_output(images, embeds, generators, size, seed, upsamplers, recorded, meta, per_image, fields)

    @torch.no_grad()
    def inpaint(
        self,
        image: Source,
        mask: Source,
        prompt: str,
        *,
        n: int = 4,
        seed: int = 0,
        size: int | None = None,
        method: str = "auto",
        candidates: int | None = None,
        resample: int = edits.REPAINT_RESAMPLE,
        use_prior: bool = True,
        prior: dict[str, Any] | None = None,
        decoder: dict[str, Any] | None = None,
        upsamplers: dict[str, dict[str, Any]] | None = None,
    ) -> EditOutput:
        """Repaint the white part of `mask` to fit `prompt`, keeping the rest (GLIDE §3.3, DALL·E 2 figure 1).

        The prompt is the caption of the whole desired image, as in GLIDE and DALL·E 2 ("a red circle above a
        green diamond" to turn the square under a red circle into a green diamond), not of the masked region
        alone. The decoder is conditioned on the prompt's prior embedding and tokens, as in generation. At every
        size the pixels outside the mask equal the input's (its centre square resized to that size; the mask
        reduced as `prepare_mask` does): the decoder and each upsampler replace the known region at every step.
        `EditOutput.low_res` holds the decoder-size images.

        Args:
            mask: white = repaint, black = keep; see `edits.prepare_mask` for sizes and greyscale.
            method: "model" (the trained inpainting decoder, pipeline.json's "inpaint", with known-region
                replacement), "repaint" (training-free RePaint with the plain decoder, `resample` jumps back
                per step) or "auto" (the model if the pipeline has one).
            candidates: fill the mask this many times per image and keep the fill whose whole image the
                pipeline's CLIP finds closest to the prompt, as text to image does (default: the pipeline's).
                Image i's candidate j uses seed + i·candidates + j.
            prior, decoder, upsamplers: per-stage overrides as in `__call__`.
        """
        size = self._check_edit(size, n, seed)
        check_count("resample", resample, 0)
        c = self.candidates if candidates is None else check_count("candidates", candidates)
        use_model = edits.use_inpaint_model(method, self.inpaint_stage is not None)
        stage = self.inpaint_stage if use_model else self.decoder
        settings = stage.settings(decoder)
        prior_settings = self.prior.settings(prior) if use_prior and self.prior is not None else None
        source, name = edits.open_source(image)
        s = self.sizes[0]
        known = square_tensor(source, s).to(self.device)  # (1, 3, s, s)
        mask_s = edits.prepare_mask(mask, source.size, s).to(self.device)  # (1, 1, s, s), 1 = repaint
        # 1. prior: the prompt's CLIP image embedding; 2. decoder: fill the mask, c times per image, and keep the
        # fill CLIP ranks first; 3. upsamplers
        text = self.encode_text([prompt] * (n * c))
        generators = self.generators(seed, n * c)
        image_embed = self.prior_embeds(text, generators, prior_settings) if use_prior else text.embed
        if use_model:
            B = n * c
            fill = {"image": known.expand(B, -1, -1, -1), "mask": mask_s.expand(B, -1, -1, -1)}
            low_res = self.decode(image_embed, text, generators, settings, inpaint=fill, prompts=[prompt] * B)
        else:
            low_res = torch.cat([self._repaint(image_embed, text, i, g, known, mask_s, settings, resample)
                                 for i, g in enumerate(generators)])  # fmt: skip
        seeds = list(range(seed, seed + n * c))
        if c > 1:
            scores = self.clip_scores(low_res, text.embed).view(n, c)
            keep = (scores.argmax(dim=1) + torch.arange(n, device=scores.device) * c).tolist()
            low_res, image_embed = low_res[keep], image_embed[keep]
            generators, seeds = [generators[i] for i in keep], [seeds[i] for i in keep]
        record = {**settings.kwargs(), "method": "model"}
        if not use_model:  # RePaint is its own ancestral sampler: the `sampler` setting is unused
            record.update(method="repaint", sampler="repaint", resample=resample)
        recorded = {"use_prior": use_prior, "candidates": c, "decoder": record}
        if prior_settings is not None:
            recorded["prior"] = prior_settings.kwargs()
        stem, mask_name = f"{slug(prompt)}_inpaint", str(mask) if isinstance(mask, (str, Path)) else "<mask>"
        meta = {"mode": "inpaint", "prompt": prompt, "source": name, "mask": mask_name}
        fields = {"names": [f"{stem}_{k:05d}" for k in seeds], "stem": stem, "low_res": low_res}
        per_image = [{"seed": k} for k in seeds]

        def known_at(side: int) -> dict[str, Tensor]:  # the upsamplers keep the known region too
            return {"image": square_tensor(source, side), "mask": edits.prepare_mask(mask, source.size, side)}

        return self._edit_output(
            low_res, image_embed, generators, size, seed, upsamplers, recorded, meta, per_image, fields, known_at
        )

    def _repaint(self, image_embed, text, i: int, generator, known, mask, settings, resample: int) -> Tensor:
        """RePaint with the plain decoder for row i of `image_embed` and `text`."""
        z, text_i = image_embed[i : i + 1], TextEmbedding(*(field[i : i + 1] for field in text))
        with self.autocast():
            out = edits.repaint_decode(
                self.decoder.model,
                self.decoder.diffusion,
                z,
                text_i,
                known,
                mask,
                settings=settings,
                resample=resample,
                generator=generator,
            )
        return out.float()

    @torch.no_grad()
    def interpolate(
        self,
        image: Source,
        *,
        image2: Source | None = None,
        prompt: str | None = None,
        from_caption: str | None = None,
        to_caption: str | None = None,
        steps: int = 5,
        max_theta: float = 0.5,
        seed: int = 0,
        invert: bool = True,
        size: int | None = None,
        prior: dict[str, Any] | None = None,
        decoder: dict[str, Any] | None = None,
        upsamplers: dict[str, dict[str, Any]] | None = None,
        inversion_steps: int = edits.INVERSION_STEPS,
        refine: int = edits.INVERSION_REFINE,
    ) -> EditOutput:
        """Frames that move an image's CLIP embedding z_1 toward a target z_2 by slerp (DALL·E 2 §3.2-3.3).

        Give exactly one target:
            image2: z_2 is a second image's embedding; t runs over [0, 1] (§3.2, figure 4).
            prompt: z_2 is the prior's image embedding for the prompt (drawn with `seed`); t over [0, 1].
            from_caption + to_caption: a text diff (§3.3, figure 5): z_2 = z_d = normalize(z_t(to) - z_t(from)),
                and θ runs over [0, max_theta] (the paper goes up to about 0.5; beyond, z_d's content takes over).

        With invert (default), frames decode DDIM-inverted latents with DDIM eta 0: for two images the slerp of
        both latents, so that the ends reconstruct the images (§3.2's first option); otherwise the image's own
        latent. Without invert, every frame decodes the same noise drawn from `seed` (§3.2's second option).
        All frames use the null caption, so that only the embedding changes along the way.

        Args:
            steps: number of frames, >= 2, ends included.
        """
        size = self._check_edit(size, 1, seed)
        mode = edits.interpolation_mode(image2, prompt, from_caption, to_caption, steps)
        inversion = (
            edits.inversion_settings(decoder, steps=inversion_steps, eta=0.0, refine=refine) if invert else None
        )
        settings = None if invert else self.decoder.settings(decoder)
        # 1. the start: the image's CLIP embedding z_1 and decoder latent x_1 (inverted, or fresh noise)
        source, name = edits.open_source(image)
        z_1 = self.clip.embed_image([source], normalize=True).to(self.device)
        if invert:
            x_1 = self.invert(source, z_1, steps=inversion_steps, refine=refine)
        else:
            x_1 = self.noise((3, self.sizes[0], self.sizes[0]), self.generators(seed, 1))
        # 2. the target z_2 (and x_2)
        x_2, recorded = x_1, {}
        if mode == "images":
            source2, name2 = edits.open_source(image2)
            z_2 = self.clip.embed_image([source2], normalize=True).to(self.device)
            x_2 = self.invert(source2, z_2, steps=inversion_steps, refine=refine) if invert else x_1
            ends = {"image2": name2}
        elif mode == "prompt":
            prior_settings = self.prior.settings(prior) if self.prior is not None else None
            z_2 = self.prior_embeds(self.encode_text([prompt]), self.generators(seed, 1), prior_settings)
            ends, recorded = {"prompt": prompt}, {"prior": prior_settings.kwargs()}
        else:
            z_t = self.encode_text([from_caption, to_caption]).embed
            z_2 = F.normalize(z_t[1:] - z_t[:1], dim=-1)  # z_d, the text diff (§3.3)
            ends = {"from_caption": from_caption, "to_caption": to_caption}
        # 3. slerp, then decode every frame with the same decoder noise; 4. upsamplers
        fractions = torch.linspace(0, max_theta if mode == "text_diff" else 1, steps, dtype=torch.float64).tolist()
        embeds = torch.cat([edits.slerp(z_1, z_2, f) for f in fractions])
        x_T = torch.cat([edits.slerp(x_1, x_2, f) for f in fractions])
        generators = [torch.Generator().manual_seed(seed) for _ in fractions]  # the same noise for every frame
        images = self._decode_without_text(embeds, x_T, generators, inversion or settings)
        recorded["decoder"] = inversion.metadata() if invert else {**settings.kwargs(), "text": "null"}
        key, stem = ("theta" if mode == "text_diff" else "t"), f"{slug(Path(name).stem)}_{mode}"
        meta = {"mode": mode if mode == "text_diff" else f"interpolate_{mode}", "source": name, **ends, "seed": seed}
        per_image = [{"frame": i, key: round(f, 6)} for i, f in enumerate(fractions)]
        fields = {"names": [f"{stem}_{i:02d}" for i in range(steps)], "stem": stem, "nrow": steps}
        return self._edit_output(images, embeds, generators, size, seed, upsamplers, recorded, meta, per_image, fields)

    # -- shared by the edits ---------------------------------------------------------------------------------

    def _check_edit(self, size: int | None, n: int, seed: int) -> int:
        check_count("n (the number of images)", n)
        check_count("seed", seed, 0)
        return self.check_size(size)

    def _decode_without_text(self, embeds: Tensor, x_T: Tensor | None, generators, settings) -> Tensor:
        """Decode (B, D) image embeddings with the null caption, image by image (each with its generator): from
        inverted latents x_T (B, 3, s, s) with DDIM (`settings` an `edits.Inversion`), or with the decoder's own
        sampler from x_T (None: fresh noise; `settings` the decoder's)."""
        text = edits.null_text(1, self.decoder.model, self.device)
        outs = []
        for i, g in enumerate(generators):
            z, x = embeds[i : i + 1], None if x_T is None else x_T[i : i + 1]
            if not isinstance(settings, edits.Inversion):
                outs.append(self.decode(z, text, [g], settings, x_T=x))
                continue
            with self.autocast():
                out = edits.ddim_decode(
                    self.decoder.model,
                    self.decoder.diffusion,
                    z,
                    text,
                    x,
                    generator=g,
                    steps=settings.steps,
                    eta=settings.eta,
                    guidance_scale=settings.guidance_scale,
                )
            outs.append(out.float())
        return torch.cat(outs)

    def _edit_output(
        self, images, embeds, generators, size, seed, upsamplers, recorded, meta, per_image, fields, known=None
    ):
        """Upsample the decoder's images to `size` -> EditOutput; each image's metadata is `meta`, its `per_image`
        entry and the settings (`recorded`, with the upsamplers'); `known` as `upsample` takes it."""
        ups = {
            s.folder: s.settings((upsamplers or {}).get(s.folder))
            for s in self.upsamplers
            if s.model.config.low_res_size < size
        }
        dtype = str(self.dtype).removeprefix("torch.")
        settings = {"size": size, "seed": seed, "dtype": dtype, **recorded, **{k: v.kwargs() for k, v in ups.items()}}
        meta = [{**meta, **p, "settings": settings} for p in per_image]
        if fields.get("low_res") is not None and size == images.shape[-1]:
            fields = {**fields, "low_res": None}  # not upsampled: the images are the decoder's
        images = self.upsample(images, size, generators, ups, known, image_embeds=embeds)
        return EditOutput(images, embeds, metadata=meta, **fields)
