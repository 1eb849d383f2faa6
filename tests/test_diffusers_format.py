"""Karlo (a diffusers UnCLIPPipeline folder) and Kandinsky 2.2's prior through unclip's pipeline, against diffusers'
own pipelines on tiny random folders saved in the published layouts (tests/diffusers_helpers.py)."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
from diffusers import UnCLIPPipeline as DiffusersUnCLIP
from PIL import Image
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from tests.diffusers_helpers import make_kandinsky_prior_folder, make_karlo_folder
from unclip.diffusers_format import UnCLIPTextProjModel, load_prior
from unclip.imageio import square_tensor
from unclip.pipeline import UnCLIPPipeline
from unclip.sampling import sample_prior

PROMPT = "a horse"


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    root = make_karlo_folder(tmp_path_factory.mktemp("karlo"))
    return root, UnCLIPPipeline.from_pretrained(root), load_reference(root)


def load_reference(root, float64=True):
    """diffusers' UnCLIPPipeline from the folder's components (diffusers 0.42's from_pretrained no longer finds
    the deprecated text_proj class that model_index.json names)."""
    classes = {
        "prior": PriorTransformer,
        "decoder": UNet2DConditionModel,
        "text_proj": UnCLIPTextProjModel,
        "text_encoder": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer,
        "super_res_first": UNet2DModel,
        "super_res_last": UNet2DModel,
        "prior_scheduler": UnCLIPScheduler,
        "decoder_scheduler": UnCLIPScheduler,
        "super_res_scheduler": UnCLIPScheduler,
    }
    parts = {name: cls.from_pretrained(root / name) for name, cls in classes.items()}
    for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        if float64:
            float64_tables(parts[name])
    return DiffusersUnCLIP(**parts)


def float64_tables(scheduler):
    """The scheduler's ᾱ tables in float64, as unclip keeps them. In float32, 1 - ᾱ_0 ≈ 4e-5 carries a relative
    rounding error of about 1e-3, by which UnCLIPScheduler's last step (to t = -1) scales x_0; the images then
    differ by that rounding, not by the model."""
    scheduler.betas = scheduler.betas.double()
    scheduler.alphas = 1 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def close(ours, theirs, rtol):
    """max |ours - theirs| / max |theirs|."""
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert error <= rtol, error


def reference_text(ref, prompts):
    ids = ref.tokenizer(prompts, padding="max_length", max_length=ref.tokenizer.model_max_length, return_tensors="pt")
    out = ref.text_encoder(ids.input_ids)
    return out.text_embeds, out.last_hidden_state, ids.attention_mask.bool()


@torch.no_grad()
def test_each_network_equals_diffusers(karlo):
    _, pipe, ref = karlo
    text = pipe.encode_text([PROMPT, "two birds"])
    embeds, hidden, mask = reference_text(ref, [PROMPT, "two birds"])
    null_embeds, null_hidden, null_mask = reference_text(ref, ["", ""])
    close(pipe.clip.embed_text([PROMPT, "two birds"]).embed, embeds, 1e-6)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([999, 400])
    # prior: conditional rows, and dropped rows = the empty prompt's encoding
    x = torch.randn(2, 32, generator=g)
    prior = pipe.prior.model
    for drop, (e, h, m) in [(False, (embeds, hidden, mask)), (True, (null_embeds, null_hidden, null_mask))]:
        ours = prior(x, t, text_embed=text.embed, text_tokens=text.tokens, text_mask=text.mask,
                     cond_drop=torch.full((2,), drop))  # fmt: skip
        theirs = ref.prior(x, timestep=t, proj_embedding=e, encoder_hidden_states=h, attention_mask=m)
        close(ours, theirs.predicted_image_embedding, 1e-5)
    close(prior.denormalize(x), ref.prior.post_process_latents(x), 1e-6)
    # decoder: text_proj + UNet on raw image embeddings, conditional and unconditional rows
    z = 5 * torch.randn(2, 32, generator=g)
    x = torch.randn(2, 3, 32, 32, generator=g)
    ours = pipe.decoder.model(x.repeat(2, 1, 1, 1), t.repeat(2), image_embed=z.repeat(2, 1),
                              text_tokens=text.tokens.repeat(2, 1, 1), text_mask=text.mask.repeat(2, 1),
                              cond_drop=torch.tensor([False, False, True, True]))  # fmt: skip
    hid, added = ref.text_proj(image_embeddings=z, prompt_embeds=torch.cat([null_embeds, embeds]),
                               text_encoder_hidden_states=torch.cat([null_hidden, hidden]),
                               do_classifier_free_guidance=True)  # fmt: skip
    mask4 = torch.nn.functional.pad(torch.cat([null_mask, mask]), (4, 0), value=True)
    theirs = ref.decoder(x.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=hid, class_labels=added,
                         attention_mask=mask4).sample  # fmt: skip
    close(ours[:2], theirs[2:], 1e-5)
    close(ours[2:], theirs[:2], 1e-5)
    # super-resolution: first for t > 0, last for t = 0, on x_t with the bicubically resized low-res image
    low = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    x = torch.randn(1, 3, 64, 64, generator=g)
    up = torch.nn.functional.interpolate(low, size=(64, 64), mode="bicubic", align_corners=False, antialias=True)
    for step, net in [(500, ref.super_res_first), (0, ref.super_res_last)]:
        ts = torch.tensor([step])
        ours = pipe.upsamplers[0].model(x, ts, low_res=low)
        close(ours, net(torch.cat([x, up], dim=1), ts).sample, 1e-5)


@torch.no_grad()
def test_ddpm_images_equal_diffusers_pipeline(karlo):
    """Same seed, same DDPM timesteps (UnCLIPScheduler's), guidance 4 and 8: the 64 px images agree."""
    _, pipe, ref = karlo
    steps = {"prior": 4, "decoder": 4, "super_res": 3}
    theirs = ref(
        PROMPT,
        generator=torch.Generator().manual_seed(7),
        prior_num_inference_steps=steps["prior"],
        decoder_num_inference_steps=steps["decoder"],
        super_res_num_inference_steps=steps["super_res"],
        output_type="np",
    ).images
    ours = pipe(
        [PROMPT],
        seed=7,
        size=64,
        prior={"sampler": "ddpm", "steps": steps["prior"]},
        decoder={"sampler": "ddpm", "steps": steps["decoder"]},
        upsamplers={"upsampler_64": {"steps": steps["super_res"]}},
    ).images
    ours = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1e-4, np.abs(ours - theirs).max()
    assert theirs.std() > 0.05  # an image, not a constant


@torch.no_grad()
def test_solvers_reranking_and_edits_run(karlo, tmp_path):
    _, pipe, _ = karlo
    fast = {"steps": 3}
    out = pipe([PROMPT, "two birds"], seed=1, size=64, candidates=2, prior=fast, decoder=fast,
               upsamplers={"upsampler_64": {"steps": 2}})  # fmt: skip  # dpm++ prior and decoder
    assert out.images.shape == (2, 3, 64, 64) and torch.isfinite(out.images).all()
    assert out.candidate_scores.shape == (2, 2) and len(out.clip_scores) == 2
    # text guidance: rows that keep the image embedding and drop the caption (the empty prompt's encoding)
    guided = pipe([PROMPT], seed=1, size=32, prior=fast, decoder={**fast, "text_guidance_scale": 2.0}).images
    plain = pipe([PROMPT], seed=1, size=32, prior=fast, decoder=fast).images
    assert torch.isfinite(guided).all() and not torch.allclose(guided, plain)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(photo)
    variations = pipe.variations(photo, n=2, inversion_steps=3, refine=0)
    assert variations.images.shape == (2, 3, 32, 32) and not torch.equal(variations.images[0], variations.images[1])
    frames = pipe.interpolate(photo, from_caption="a horse", to_caption="a bird", steps=3, inversion_steps=3, refine=0)
    assert frames.images.shape == (3, 3, 32, 32) and torch.isfinite(frames.images).all()
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (0, 0, 20, 40))
    painted = pipe.inpaint(photo, mask, "a bird", n=1, decoder=fast, prior=fast, resample=1)
    kept = painted.images[0, :, :, 18:]  # the unmasked right part equals the input (at the decoder's 32 px)
    assert torch.allclose(kept, square_tensor(Image.open(photo), 32)[0, :, :, 18:], atol=1e-6)
    assert not torch.allclose(painted.images[0, :, :, :14], square_tensor(Image.open(photo), 32)[0, :, :, :14])


def test_without_image_tower_reranking_and_edits_are_refused(karlo, tmp_path):
    """kakaobrain/karlo-v1-alpha has no image tower: generation works, reranking and the edits say what to add."""
    text_only = tmp_path / "text_only"
    shutil.copytree(karlo[0], text_only, ignore=shutil.ignore_patterns("image_encoder", "feature_extractor"))
    pipe = UnCLIPPipeline.from_pretrained(text_only)
    fast = {"steps": 2}
    assert pipe([PROMPT], size=32, prior=fast, decoder=fast).images.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="no image tower.*image_encoder/ and feature_extractor/"):
        pipe([PROMPT], size=32, candidates=2, prior=fast, decoder=fast)
    with pytest.raises(ValueError, match="no image tower"):
        pipe.variations(Image.new("RGB", (32, 32)), n=1)


@pytest.fixture(scope="module")
def kandinsky(tmp_path_factory):
    return make_kandinsky_prior_folder(tmp_path_factory.mktemp("kandinsky"))


def test_folders_it_cannot_sample_are_refused(karlo, kandinsky, tmp_path):
    with pytest.raises(ValueError, match="a prior and its CLIP, without a decoder.*load_prior"):
        UnCLIPPipeline.from_pretrained(kandinsky)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(karlo[0], incomplete)
    shutil.rmtree(incomplete / "decoder")
    with pytest.raises(ValueError, match="UnCLIPPipeline folder without decoder"):
        UnCLIPPipeline.from_pretrained(incomplete)


@torch.no_grad()
def test_kandinsky_prior_equals_diffusers(kandinsky):
    root = kandinsky
    clip, prior = load_prior(root)
    ref = KandinskyV22PriorPipeline.from_pretrained(root)
    float64_tables(ref.scheduler)
    theirs = ref(PROMPT, num_inference_steps=5, guidance_scale=4.0, generator=torch.Generator().manual_seed(3))
    text = clip.embed_text([PROMPT], normalize=True)
    ours = sample_prior(prior.model, prior.diffusion, text.embed, text.tokens, text.mask, sampler="ddpm", steps=5,
                        guidance_scale=4.0, generator=[torch.Generator().manual_seed(3)])  # fmt: skip
    close(ours, theirs.image_embeds, 1e-5)
    # and through the network alone, a dropped row sees the empty prompt
    e, h, m = reference_text(ref, [""])
    x, t = torch.randn(1, 32), torch.tensor([10])
    ours = prior.model(x, t, text_embed=text.embed, text_tokens=text.tokens, text_mask=text.mask,
                       cond_drop=torch.tensor([True]))  # fmt: skip
    close(ours, ref.prior(x, timestep=t, proj_embedding=e, encoder_hidden_states=h, attention_mask=m)[0], 1e-5)
