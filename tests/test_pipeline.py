import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import make_tiny_pipeline

from unclip.imageio import read_png_metadata
from unclip.pipeline import UnCLIPPipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipe"), inpaint=True)


def test_pipeline_generates_at_each_size_and_seeds_reproduce(tiny_pipeline):
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline)
    assert pipe.sizes == [16, 32]
    a = pipe(["a red circle", "a blue square"], seed=3)
    assert a.images.shape == (2, 3, 16, 16) and a.images.abs().max() <= 1
    assert a.seeds == [3, 4] and a.settings["prior"]["steps"] == 3
    b = pipe(["a blue square"], seed=4)  # the same image, made alone: equal up to batched-kernel rounding
    torch.testing.assert_close(b.images[0], a.images[1], rtol=0, atol=1e-4)
    c = pipe(["a red circle", "a blue square"], seed=3, size=32)
    assert c.images.shape == (2, 3, 32, 32)
    assert not torch.equal(pipe(["a red circle"], seed=5).images, a.images[:1])
    no_prior = pipe(["a red circle"], seed=3, use_prior=False)
    torch.testing.assert_close(no_prior.image_embeds, no_prior.text_embeds)


def test_ancestral_samplers_also_give_an_image_independent_of_its_batch(tiny_pipeline):
    """DDPM draws noise at every step; each image draws all of it from its own generator, in the prior and
    the decoder, so the second prompt's image is the one it gets alone with its seed."""
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline)
    ddpm = {"prior": {"sampler": "ddpm", "steps": 4}, "decoder": {"sampler": "ddpm", "steps": 4}}
    a = pipe(["a red circle", "a blue square"], seed=3, **ddpm)
    b = pipe(["a blue square"], seed=4, **ddpm)
    torch.testing.assert_close(b.image_embeds[0], a.image_embeds[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(b.images[0], a.images[1], rtol=0, atol=1e-4)


def test_a_decoder_reading_word_embeddings_gets_them_from_the_pipeline(tmp_path):
    """With model.text_words the decoder needs the caption's CLIP word embeddings; the pipeline passes them,
    to text-to-image and to the edits that decode with the caption (inpainting with RePaint)."""
    pipe = UnCLIPPipeline.from_pretrained(make_tiny_pipeline(tmp_path, decoder_changes=["model.text_words=true"]))
    assert pipe.decoder.model.config.text_words
    out = pipe(["a red circle above a blue square"], seed=0)
    assert out.images.shape == (1, 3, 16, 16)
    path = out.save(tmp_path / "out")[0]
    mask = Image.new("L", (16, 16))
    mask.paste(255, (4, 4, 12, 12))
    edit = pipe.inpaint(path, mask, "a red circle", n=1, seed=0, decoder={"steps": 2})
    assert edit.images.shape == (1, 3, 16, 16)
    variation = pipe.variations(path, n=1, inversion_steps=2, size=16)
    assert variation.images.shape == (1, 3, 16, 16)


def test_reranking_keeps_the_best_candidate(tiny_pipeline):
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline)
    out = pipe(["a red circle", "a green diamond"], seed=0, candidates=3)
    assert out.images.shape == (2, 3, 16, 16) and out.settings["candidates"] == 3
    all_ = pipe(["a red circle"] * 3 + ["a green diamond"] * 3, seed=0)
    scores = (pipe.clip.embed_image(all_.images, normalize=True) * all_.text_embeds).sum(-1).view(2, 3)
    assert out.seeds == [int(scores[0].argmax()), 3 + int(scores[1].argmax())]
    torch.testing.assert_close(torch.tensor(out.clip_scores), scores.max(1).values)
    # every candidate comes back with its score, in seed order, the kept one among them
    assert out.candidate_images.shape == (2, 3, 3, 16, 16)
    torch.testing.assert_close(out.candidate_images.flatten(0, 1), all_.images, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.candidate_scores, scores, rtol=0, atol=1e-4)
    assert torch.equal(out.candidate_images[1, out.seeds[1] - 3], out.images[1])
    assert pipe(["a red circle"], seed=0).candidate_images is None
    # the kept seed alone reproduces the kept image
    again = pipe(["a green diamond"], seed=out.seeds[1])
    torch.testing.assert_close(again.images[0], out.images[1], rtol=0, atol=1e-4)


def test_reranking_scores_at_the_decoder_size_and_upsamples_only_the_kept(tiny_pipeline, monkeypatch):
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline)
    small = pipe(["a red circle", "a green diamond"], seed=0, candidates=3)
    upsampled = []
    upsample = pipe.upsample
    monkeypatch.setattr(
        pipe, "upsample", lambda images, *a, **k: upsampled.append(len(images)) or upsample(images, *a, **k)
    )
    big = pipe(["a red circle", "a green diamond"], seed=0, candidates=3, size=32)
    assert upsampled == [2] and big.images.shape == (2, 3, 32, 32)
    assert big.seeds == small.seeds and big.clip_scores == small.clip_scores
    again = pipe(["a green diamond"], seed=big.seeds[1], size=32)  # the kept seed alone, upsampled the same
    torch.testing.assert_close(again.images[0], big.images[1], rtol=0, atol=1e-4)


def test_bad_input_is_a_clear_error(tiny_pipeline, tmp_path):
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline)
    with pytest.raises(ValueError, match="empty prompt"):
        pipe(["  "])
    with pytest.raises(ValueError, match=r"choose one of \[16, 32\]"):
        pipe(["a red circle"], size=1024)
    with pytest.raises(ValueError, match="no pipeline.json"):
        UnCLIPPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        UnCLIPPipeline.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((tiny_pipeline / "pipeline.json").read_text())
    (broken / "pipeline.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="incomplete"):
        UnCLIPPipeline.from_pretrained(broken)
    (broken / "pipeline.json").write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        UnCLIPPipeline.from_pretrained(broken)


def test_generate_script_writes_pngs_with_metadata(tiny_pipeline, tmp_path, capsys):
    from sample.generate import main

    paths = main(
        [
            "--prompt",
            "a small red circle",
            "--n",
            "2",
            "--seed",
            "7",
            "--pipeline",
            str(tiny_pipeline),
            "--out",
            str(tmp_path),
            "--steps",
            "2",
        ]
    )
    assert [p.name for p in paths] == [
        "a_small_red_circle_00007.png",
        "a_small_red_circle_00008.png",
        "a_small_red_circle_grid.png",
    ]
    assert str(paths[0]) in capsys.readouterr().out
    meta = read_png_metadata(paths[0])
    assert meta["prompt"] == "a small red circle" and json.loads(meta["seed"]) == 7
    settings = json.loads(meta["settings"])
    assert settings["size"] == 32 and settings["decoder"]["steps"] == 2 and settings["prior"]["steps"] == 3
    # the metadata is enough to make the same image again
    again = main(
        [
            "--prompt",
            meta["prompt"],
            "--n",
            "1",
            "--seed",
            meta["seed"],
            "--pipeline",
            str(tiny_pipeline),
            "--out",
            str(tmp_path / "again"),
            "--steps",
            str(settings["decoder"]["steps"]),
        ]
    )
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (paths[0], again[0]))
    assert np.abs(a - b).max() <= 1  # 8-bit rounding of float noise between batch sizes


def test_generate_script_several_prompts(tiny_pipeline, tmp_path):
    from sample.generate import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na blue square\n\n  a green diamond  \n")
    common = ["--n", "2", "--seed", "3", "--pipeline", str(tiny_pipeline), "--out", str(tmp_path), "--steps", "2"]
    paths = main(["--prompt", "a red circle", "--prompts-file", str(prompts), *common])
    assert [p.name for p in paths] == [
        "a_red_circle_00003.png",
        "a_red_circle_00004.png",
        "a_blue_square_00005.png",
        "a_blue_square_00006.png",
        "a_green_diamond_00007.png",
        "a_green_diamond_00008.png",
        "a_red_circle_and_2_more_grid.png",
    ]
    assert read_png_metadata(paths[5])["prompt"] == "a green diamond"
    assert Image.open(paths[-1]).size == (2 * 34 + 2, 3 * 34 + 2)  # a row of n=2 per prompt, 32 px tiles
    # an image of a multi-prompt run is made again from its own metadata
    meta = read_png_metadata(paths[2])
    again = main(["--prompt", meta["prompt"], *common[:2], "--seed", meta["seed"], *common[4:]])
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (paths[2], again[0]))
    assert np.abs(a - b).max() <= 1


def test_generate_script_errors(tiny_pipeline, tmp_path, capsys):
    from sample.generate import main

    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    for argv, message in [
        ([], "give a prompt"),
        (["--prompts-file", str(tmp_path / "empty.txt")], "holds no prompts"),
        (["--prompts-file", str(tmp_path / "missing.txt")], "cannot read --prompts-file"),
        (["--prompt", "a red circle", "--n", "0"], "--n: must be >= 1"),
    ]:
        with pytest.raises(SystemExit):  # usage errors, before any model is loaded
            main([*argv, "--pipeline", str(tiny_pipeline)])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--candidates \(candidates\) must be a whole number >= 1"):
        main(
            ["--prompt", "a red circle", "--candidates", "0", "--pipeline", str(tiny_pipeline), "--out", str(tmp_path)]
        )
    with pytest.raises(SystemExit, match=r"--guidance \(decoder.guidance_scale\) must be a finite number"):
        main(
            ["--prompt", "a red circle", "--guidance", "nan", "--pipeline", str(tiny_pipeline), "--out", str(tmp_path)]
        )
    with pytest.raises(SystemExit, match=r"--steps \(decoder.steps\) must be a whole number >= 1"):
        main(["--prompt", "a red circle", "--steps", "0", "--pipeline", str(tiny_pipeline), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="empty prompt"):
        main(["--prompt", "", "--pipeline", str(tiny_pipeline), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no pipeline.json"):
        main(["--prompt", "a red circle", "--pipeline", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="choose one of"):
        main(["--prompt", "a red circle", "--size", "48", "--pipeline", str(tiny_pipeline), "--out", str(tmp_path)])


def test_pipeline_decodes_given_image_embeddings(tiny_pipeline):
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline)
    prompts, steps = ["a red circle", "a blue square above a green circle"], {"steps": 2}
    raw = pipe(prompts, seed=4, decoder=steps, use_prior=False)  # decodes the text embeddings, no prior noise
    given = pipe(prompts, seed=4, decoder=steps, image_embeds=raw.text_embeds)
    assert torch.equal(given.images, raw.images) and torch.equal(given.image_embeds, raw.text_embeds)
    assert given.settings["image_embeds"] == "given" and "prior" not in given.settings
    sampled = pipe(prompts, seed=4, prior=steps, decoder=steps)
    other = pipe(prompts, seed=4, decoder=steps, image_embeds=sampled.image_embeds)
    assert torch.equal(other.image_embeds, sampled.image_embeds) and not torch.equal(other.images, raw.images)
    with pytest.raises(ValueError, match="must have shape"):
        pipe(prompts, image_embeds=sampled.image_embeds[:1])
    # reranking given embeddings: each is decoded `candidates` times and the decoder's samples are ranked
    best = pipe(prompts, seed=4, decoder=steps, image_embeds=sampled.image_embeds, candidates=3)
    assert torch.equal(best.image_embeds, sampled.image_embeds) and best.seeds[1] in (7, 8, 9)
    alone = pipe(prompts[1:], seed=best.seeds[1], decoder=steps, image_embeds=sampled.image_embeds[1:])
    torch.testing.assert_close(alone.images[0], best.images[1], rtol=0, atol=1e-4)


def test_text_guidance_from_the_command_line(tiny_pipeline, tmp_path, capsys):
    from sample.generate import main

    common = ["--prompt", "a red circle", "--n", "1", "--pipeline", str(tiny_pipeline), "--steps", "2"]
    plain = main([*common, "--out", str(tmp_path / "plain")])
    guided = main([*common, "--out", str(tmp_path / "guided"), "--text-guidance", "3"])
    assert json.loads(read_png_metadata(guided[0])["settings"])["decoder"]["text_guidance_scale"] == 3.0
    assert json.loads(read_png_metadata(plain[0])["settings"])["decoder"]["text_guidance_scale"] == 0.0
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (plain[0], guided[0]))
    assert np.abs(a - b).max() > 8  # the caption's direction changed the image
    with pytest.raises(
        SystemExit, match=r"--text-guidance \(decoder.text_guidance_scale\) must be a finite number >= 0"
    ):
        main([*common, "--out", str(tmp_path), "--text-guidance", "-1"])


@pytest.mark.parametrize("dtype", ["bf16"])
def test_reduced_precision_runs(tiny_pipeline, dtype):
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline, dtype=dtype)
    out = pipe(["a red circle"], seed=0, prior={"steps": 2}, decoder={"steps": 2})
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    assert out.settings["dtype"] == "bfloat16"


def test_assemble_script_with_fp16_weights(tiny_pipeline, tmp_path):
    from train.pipeline import main

    parts = tiny_pipeline.parent / "parts"
    out = main(
        [
            "--out",
            str(tmp_path / "p16"),
            "--clip",
            str(parts / "clip"),
            "--prior",
            str(parts / "prior"),
            "--decoder",
            str(parts / "decoder"),
            "--upsampler",
            str(parts / "up"),
            "--fp16",
        ]
    )
    for folder, weights in (("decoder", "model.safetensors"), ("clip", "open_clip_model.safetensors")):
        size = (out / folder / weights).stat().st_size
        assert size < 0.6 * (parts / folder / weights).stat().st_size
    full = UnCLIPPipeline.from_pretrained(tiny_pipeline)(
        ["a red circle"], seed=0, prior={"steps": 3}, decoder={"steps": 3}
    )
    half = UnCLIPPipeline.from_pretrained(out)(["a red circle"], seed=0, prior={"steps": 3}, decoder={"steps": 3})
    assert (full.images - half.images).abs().mean() < 0.05  # fp16 storage, fp32 compute
    with pytest.raises(SystemExit, match="not a folder"):
        main(["--out", str(tmp_path / "x"), "--clip", str(parts / "clip"), "--decoder", str(tmp_path / "missing")])


def test_assemble_around_a_component_already_in_the_folder(tiny_pipeline, tmp_path):
    # the bundled pipelines keep their CLIP in the pipeline folder (models/shapes/clip) and add the rest later
    from train.pipeline import main

    parts = tiny_pipeline.parent / "parts"
    shutil.copytree(parts / "clip", tmp_path / "p" / "clip")
    out = main(
        ["--out", str(tmp_path / "p"), "--clip", str(tmp_path / "p" / "clip"), "--decoder", str(parts / "decoder")]
    )
    pipe = UnCLIPPipeline.from_pretrained(out)
    assert pipe(["a red circle"], seed=0, decoder={"steps": 2}, use_prior=False).images.shape[0] == 1


def test_demo_script_generates_and_prints_the_path(tiny_pipeline, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "UNCLIP_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    args = ["--pipeline", str(tiny_pipeline), "--out", str(tmp_path), "--steps", "2", "--n", "1"]
    done = subprocess.run(
        ["bash", "sample/demo.sh", "a blue square", *args], env=env, capture_output=True, text=True, check=True
    )
    image = tmp_path / "a_blue_square_00000.png"
    assert image.is_file() and str(image) in done.stdout
    usage = subprocess.run(["bash", "sample/demo.sh"], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_demo_script_reinstalls_after_a_halfway_install(tmp_path):
    """A .venv whose python exists but whose install stopped halfway (no torch) is installed into again,
    not taken as ready; fake python/pip scripts stand in for the real ones."""
    import subprocess

    (tmp_path / "sample").mkdir()
    shutil.copy("sample/demo.sh", tmp_path / "sample" / "demo.sh")
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    log = tmp_path / "calls.log"
    (bin_ / "python").write_text(
        f'#!/bin/sh\nif [ "$1" = "-c" ]; then [ -f {tmp_path}/installed ]; exit $?; fi\necho "python $*" >> {log}\n'
    )
    (bin_ / "pip").write_text(f'#!/bin/sh\necho "pip $*" >> {log}\ntouch {tmp_path}/installed\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "UNCLIP_PYTHON"}
    demo = ["bash", str(tmp_path / "sample" / "demo.sh"), "a red circle"]
    run = subprocess.run(demo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("pip install -q torch==") and calls[1] == "pip install -q -e ."
    assert calls[2] == "python sample/generate.py --prompt a red circle"
    said = [line.strip() for line in run.stderr.splitlines()]  # what the demo is doing, as it does it
    assert said[1:4] == [
        "1/2 torch and torchvision (the largest part)...",
        "2/2 unclip and its dependencies...",
        "installed.",
    ]
    assert said[4] == 'generating "a red circle" (each image\'s path is printed when it is written)...'
    log.unlink()
    subprocess.run(demo, env=env, check=True)
    assert log.read_text().splitlines() == ["python sample/generate.py --prompt a red circle"]  # no second install


def test_image_stages_sample_channels_last_with_the_same_result(tiny_pipeline):
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline)
    weight = next(p for p in pipe.decoder.model.parameters() if p.ndim == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    fast = pipe(["a red circle"], seed=0, prior={"steps": 2}, decoder={"steps": 3}).images
    for stage in (pipe.decoder, *pipe.upsamplers):
        stage.model.config.channels_last = False
        stage.model.to(memory_format=torch.contiguous_format)
    plain = pipe(["a red circle"], seed=0, prior={"steps": 2}, decoder={"steps": 3}).images
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)


def test_assemble_script_stores_sampling_defaults(tiny_pipeline, tmp_path):
    from train.pipeline import main

    parts = tiny_pipeline.parent / "parts"
    base = ["--clip", str(parts / "clip"), "--prior", str(parts / "prior"), "--decoder", str(parts / "decoder")]
    defaults = ["decoder.guidance_scale=1", "prior.steps=3", "candidates=3", "preview_steps=2"]
    out = main(["--out", str(tmp_path / "p"), *base, *(a for d in defaults for a in ("--default", d))])
    assert json.loads((out / "pipeline.json").read_text())["defaults"] == {
        "decoder": {"guidance_scale": 1.0},
        "prior": {"steps": 3},
        "candidates": 3,
        "preview_steps": 2,
    }
    made = UnCLIPPipeline.from_pretrained(out)(["a red circle"], seed=0, decoder={"steps": 2})
    assert made.settings["decoder"]["guidance_scale"] == 1.0 and made.settings["prior"]["steps"] == 3
    assert made.settings["candidates"] == 3 and made.clip_scores is not None
    assert made.settings["preview_steps"] == 2
    # the same images as the stored settings given by hand to a pipeline without defaults
    plain = main(["--out", str(tmp_path / "plain"), *base])
    by_hand = UnCLIPPipeline.from_pretrained(plain)(
        ["a red circle"],
        seed=0,
        prior={"steps": 3},
        decoder={"steps": 2, "guidance_scale": 1.0},
        candidates=3,
        preview_steps=2,
    )
    assert torch.equal(made.images, by_hand.images) and made.seeds == by_hand.seeds
    one = UnCLIPPipeline.from_pretrained(out)(["a red circle"], seed=0, decoder={"steps": 2}, candidates=1)
    assert one.clip_scores is None and one.settings["candidates"] == 1  # the caller overrides it
    # variations rerank by their own default, not the pipeline's text-to-image candidates, and say so
    source = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    varied = UnCLIPPipeline.from_pretrained(out).variations(source, n=1, invert=False, decoder={"steps": 2})
    assert varied.metadata[0]["settings"]["candidates"] == 4
    one = UnCLIPPipeline.from_pretrained(out).variations(source, n=1, invert=False, decoder={"steps": 2}, candidates=1)
    assert "candidates" not in one.metadata[0]["settings"]  # no claim of a reranking it did not do
    for bad, message in [
        ("decoder.guidance_scale", "STAGE.SETTING=VALUE"),
        ("coder.steps=3", "unknown stage"),
        ("decoder.eta=2", "no setting 'eta'"),
        ("decoder.candidates=3", "no setting 'candidates'"),
        ("candidates=0", "candidates must be a whole number >= 1"),
        ("decoder.steps=many", "takes a whole number"),
        ("decoder.sampler=euler", "sampler must be one of"),
        ("prior.guidance_scale=-1", "must be a finite number >= 0"),
        ("prior.guidance_scale=inf", "must be a finite number >= 0"),
        ("pruning=4:2,2:1", "pruning must be STEP:KEEP pairs"),
    ]:
        with pytest.raises(SystemExit, match=message):
            main(["--out", str(tmp_path / "bad"), *base, "--default", bad])
    # a pruning schedule is stored as written and is the pipeline's default
    pruned = main(["--out", str(tmp_path / "pruned"), *base, "--default", "candidates=4", "--default", "pruning=1:2"])
    assert json.loads((pruned / "pipeline.json").read_text())["defaults"]["pruning"] == "1:2"
    made = UnCLIPPipeline.from_pretrained(pruned)(["a red circle"], seed=0, decoder={"steps": 2})
    assert made.settings["pruning"] == "1:2"


def test_generate_help_does_not_import_torch():
    code = (
        "import runpy, sys\n"
        "sys.argv = ['generate.py', '--help']\n"
        "try:\n    runpy.run_path('sample/generate.py', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported for --help'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "--candidates" in done.stdout and "Traceback" not in done.stderr


def test_the_pipeline_reports_each_stage_step(tiny_pipeline):
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline)
    reports = []
    pipe.progress = reports.append
    pipe(["a red circle", "a blue square"], seed=0, candidates=2, size=32)
    stages = [(r["stage"], r["images"]) for r in reports if r["step"] == r["steps"]]
    assert stages == [
        ("prior", 4),
        ("decoder", 4),
        ("upsampler_32 (image 1 of 2)", 1),
        ("upsampler_32 (image 2 of 2)", 1),
    ]
    assert [r["step"] for r in reports if r["stage"] == "decoder"] == [1, 2, 3]  # the pipeline's 3 decoder steps


def test_generate_prints_one_line_per_image_and_no_progress_off_a_terminal(tiny_pipeline, tmp_path):
    argv = ["--prompt", "a red circle", "--n", "3", "--batch-size", "2", "--pipeline", str(tiny_pipeline)]
    done = subprocess.run(
        [sys.executable, "sample/generate.py", *argv, "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(tmp_path / f"a_red_circle_{i:05d}.png") for i in range(3)] + [
        str(tmp_path / "a_red_circle_grid.png")
    ]
    assert "decoder" not in done.stderr and "it/s" not in done.stderr


def test_previews_rank_the_candidates_and_the_kept_one_is_sampled_in_full(tiny_pipeline):
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline)
    prompts, steps = ["a red circle", "a green diamond"], {"steps": 4}
    out = pipe(prompts, seed=3, candidates=4, preview_steps=1, decoder=steps)
    assert out.settings["preview_steps"] == 1 and out.candidate_images.shape == (2, 4, 3, 16, 16)
    # the kept candidate is the one whose 1-step preview scored best...
    best = out.candidate_scores.argmax(dim=1).tolist()
    assert out.seeds == [3 + i * 4 + j for i, j in enumerate(best)]
    assert out.clip_scores == pytest.approx(out.candidate_scores.max(dim=1).values.tolist())
    # ...and the image is that candidate sampled in full: the same as making it alone from its seed
    for i, (prompt, seed) in enumerate(zip(prompts, out.seeds, strict=True)):
        alone = pipe([prompt], seed=seed, candidates=1, decoder=steps).images
        torch.testing.assert_close(out.images[i : i + 1], alone, atol=1e-5, rtol=0)
    # the previews are not the full samples, and preview_steps 0 samples every candidate in full
    assert not torch.allclose(out.candidate_images[0, best[0]], out.images[0], atol=1e-3)
    full = pipe(prompts, seed=3, candidates=4, preview_steps=0, decoder=steps)
    assert "preview_steps" not in full.settings
    torch.testing.assert_close(full.candidate_images[1, 2], pipe(prompts[1:], seed=3 + 6, decoder=steps).images[0])
    with pytest.raises(ValueError, match="preview_steps must be a whole number >= 0"):
        pipe(prompts, candidates=2, preview_steps=-1)


def test_pruning_drops_candidates_by_their_x0_scores_and_keeps_full_samples(tiny_pipeline):
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline)
    prompts, steps, c = ["a red circle", "a green diamond"], {"steps": 4}, 6
    # every candidate in full, with the CLIP score of each one's x0 prediction after every step
    x0s = []
    record = lambda info: x0s.append(info["x0"].float().clamp(-1, 1))  # noqa: E731
    pipe.step_callback = lambda stage, images=None: record if stage == "decoder" else None
    full = pipe(prompts, seed=5, candidates=c, pruning="none", decoder=steps)
    del pipe.step_callback
    text = pipe.encode_text([p for p in prompts for _ in range(c)]).embed
    scores = torch.stack([pipe.clip_scores(x0, text).view(2, c) for x0 in x0s])  # (steps, prompts, c)
    # decoder rows evaluated (twice each with guidance): 6 candidates for step 1, 3 for step 2, 2 for steps 3, 4
    rows, reports = [], []
    hook = pipe.decoder.model.register_forward_hook(lambda module, args, out: rows.append(out.shape[0]))
    pipe.progress = reports.append
    out = pipe(prompts, seed=5, candidates=c, pruning="1:3,2:2", decoder=steps)
    hook.remove()
    pipe.progress = None
    assert rows[0] % 12 == 0 and rows == [rows[0] // 6 * n for n in (6, 3, 2, 2)]
    assert [r["images"] for r in reports if r["stage"] == "decoder"] == [12, 6, 4, 4]  # the progress says so too
    assert out.settings["pruning"] == "1:3,2:2" and "pruning" not in full.settings
    for i in range(2):
        alive = scores[0, i].topk(3).indices.tolist()
        alive = sorted(alive, key=lambda j: -scores[1, i, j].item())[:2]
        kept = max(alive, key=lambda j: full.candidate_scores[i, j].item())
        assert out.seeds[i] == 5 + i * c + kept
        # the kept image is that candidate's full sample
        torch.testing.assert_close(out.images[i], full.candidate_images[i, kept], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pruning must be STEP:KEEP pairs"):
        pipe(prompts, candidates=2, pruning="3:4,2:2")
