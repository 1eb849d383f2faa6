"""The web app (unclip.app): its handlers on the tiny random pipeline, and the whole app in headless Chromium.

The browser test starts `python -m unclip.app` on a free local port and drives Debian's chromium with selenium
(tests/app_browser.py). It writes a screenshot of each tab; set UNCLIP_APP_SCREENSHOTS=DIR to keep them
(the docs' screenshots are made on the bundled pipeline by `python tests/app_browser.py`).
"""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio", reason="the web app needs the app extra: pip install -e '.[app]'")

from app_browser import AppProcess, Page, fetch, inpaint, interpolate, missing_browser, variations  # noqa: E402
from pipeline_helpers import make_tiny_pipeline  # noqa: E402

from unclip.app import App, build_app  # noqa: E402
from unclip.app.__main__ import parse_args, port_problem  # noqa: E402
from unclip.app.handlers import mask_from_editor, model_card_info  # noqa: E402
from unclip.app.ui import about_markdown, readable  # noqa: E402
from unclip.imageio import read_png_metadata  # noqa: E402
from unclip.pipeline import DEFAULT_PIPELINE, UnCLIPPipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def app(tiny, tmp_path_factory):
    return App(UnCLIPPipeline.from_pretrained(tiny), tiny, tmp_path_factory.mktemp("out"))


def picture(path: Path, size=(32, 32), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def error_text(call) -> str:
    with pytest.raises(gr.Error) as e:
        call()
    return str(e.value.message)


def test_command_line_defaults():
    args = parse_args([])
    assert (args.host, args.port, args.pipeline, args.share) == ("127.0.0.1", 7860, DEFAULT_PIPELINE, False)


def test_a_port_in_use_is_a_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "choose another port with --port" in port_problem("127.0.0.1", port)
    assert port_problem("127.0.0.1", port) is None


def test_about_line_names_model_card_and_licence(app):
    shapes = model_card_info(ROOT / "models" / "shapes")
    assert shapes["licence"] == "MIT, as the repository" and shapes["attribution"] is None
    emoji = model_card_info(ROOT / "models" / "openmoji")
    assert emoji["licence"].startswith("CC BY-SA 4.0")
    assert "All emojis designed by OpenMoji – the open-source emoji and icon project" in emoji["attribution"]
    assert "CC BY-SA 4.0" in emoji["attribution"]
    text = about_markdown(app)  # the tiny pipeline has no model card
    assert str(app.folder) in text and "Licence:** see the model card" in text


def test_one_pipeline_call_at_a_time(app):
    demo = build_app(app)
    running = [f for f in demo.fns.values() if f.concurrency_id == "pipeline"]
    assert len(running) == 5  # generate (button and Enter), variations, inpaint, interpolate
    assert all(f.concurrency_limit == 1 for f in running)


def test_generate_writes_pngs_with_metadata(app):
    advanced = {"decoder.steps": 2, "decoder.sampler": "ddim", "prior.steps": None, "upsampler_32.steps": 1}
    steps = list(app.generate("a red circle", 2, 5, "32", 1, True, advanced))
    assert [len(s) for s in steps] == [1, 2]  # one image at a time
    for i, path in enumerate(steps[-1]):
        assert Image.open(path).size == (32, 32)
        meta = read_png_metadata(path)
        settings = json.loads(meta["settings"])
        assert meta["prompt"] == "a red circle" and json.loads(meta["seed"]) == 5 + i
        assert settings["decoder"]["steps"] == 2 and settings["decoder"]["sampler"] == "ddim"
        assert settings["upsampler_32"]["steps"] == 1 and settings["prior"]["steps"] == 3  # the pipeline's


def test_bad_inputs_get_messages(app, tmp_path):
    assert "No prompt" in error_text(lambda: list(app.generate("  ", 1, 0, "16", 1, True, {})))
    assert "Size 48 is not one this pipeline makes; choose one of [16, 32]" in error_text(
        lambda: list(app.generate("a red circle", 1, 0, "48", 1, True, {}))
    )
    assert "Size 'big' is not a number" in error_text(lambda: list(app.generate("a", 1, 0, "big", 1, True, {})))
    assert "decoder.steps must be a whole number >= 1" in error_text(
        lambda: list(app.generate("a red circle", 1, 0, "16", 1, True, {"decoder.steps": 0}))
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert "Cannot read the image" in error_text(lambda: app.variations(str(broken), 1, 0, "16", True, 0.5, 2, None))
    assert "No image" in error_text(lambda: app.variations(None, 1, 0, "16", True, 0.5, 2, None))
    # gradio's upload itself: an unreadable file gets the same kind of message, not gradio's bare "Error"
    payload = gr.data_classes.FileData(path=str(broken), orig_name="broken.png")
    assert "Cannot read the uploaded image" in error_text(
        lambda: readable(gr.Image(type="filepath")).preprocess(payload)
    )
    image = Image.open(picture(tmp_path / "a.png")).convert("RGBA")
    editor = {"background": image, "layers": [Image.new("RGBA", (32, 32))], "composite": image}
    assert "No mask" in error_text(lambda: app.inpaint(editor, None, "a blue square", 1, 0, "16", "auto", {}))
    wide_mask = picture(tmp_path / "mask.png", size=(64, 32))
    assert "aspect ratios differ" in error_text(
        lambda: app.inpaint(editor, str(wide_mask), "a blue square", 1, 0, "16", "auto", {})
    )
    assert "no inpainting decoder" in error_text(
        lambda: app.inpaint(editor, str(wide_mask.with_name("a.png")), "a", 1, 0, "16", "model", {})
    )


def test_out_of_memory_is_a_message(app, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(app.pipe, "batches", oom)
    assert "Out of memory" in error_text(lambda: list(app.generate("a red circle", 1, 0, "16", 1, True, {})))


def test_inpaint_with_a_painted_mask(app, tmp_path):
    image = Image.open(picture(tmp_path / "a.png")).convert("RGBA")
    layer = Image.new("RGBA", (32, 32))
    layer.paste((255, 0, 255, 150), (0, 0, 16, 32))  # the left half painted, translucent magenta
    editor = {"background": image, "layers": [layer], "composite": image}
    mask = np.asarray(mask_from_editor(editor))
    assert (mask[:, :16] == 255).all() and (mask[:, 16:] == 0).all()
    paths, mask_path = app.inpaint(editor, None, "a blue square", 1, 0, "16", "auto", {"decoder.steps": 2})
    meta = read_png_metadata(paths[0])
    assert meta["mode"] == "inpaint" and meta["prompt"] == "a blue square"
    assert Image.open(paths[0]).size == (16, 16) and Image.open(mask_path).size == (32, 32)
    out = np.asarray(Image.open(paths[0]), dtype=np.int16)
    kept = np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(out[:, 8:] - kept[:, 8:]).max() <= 1  # the unpainted half is the input's


def test_variations_and_caption_edit(app, tmp_path):
    source = str(picture(tmp_path / "a.png"))
    paths = app.variations(source, 2, 3, "16", True, 0.5, 2, 1.0)  # fresh noise, 2 decoder steps
    seeds = [json.loads(read_png_metadata(p)["seed"]) for p in paths[:2]]
    assert len(paths) == 3 and 3 <= seeds[0] <= 6 and 7 <= seeds[1] <= 10  # the best of 4 decodings each
    assert json.loads(read_png_metadata(paths[0])["settings"])["decoder"]["steps"] == 2
    frames, strip = app.interpolate(
        source, "caption edit", None, "a red circle", "a red square", 3, 0.4, 0, "16", True
    )
    thetas = [json.loads(read_png_metadata(p)["theta"]) for p in frames]
    assert thetas == [0.0, 0.2, 0.4] and read_png_metadata(frames[0])["to_caption"] == "a red square"
    assert Image.open(strip).size[0] > 3 * 16
    assert "both captions" in error_text(
        lambda: app.interpolate(source, "caption edit", None, "", "a", 3, 0.4, 0, 16, 1)
    )


def test_app_in_browser(tiny, tmp_path):
    reason = missing_browser()
    if reason:
        pytest.skip(f"no browser for the browser test: {reason}")
    pytest.importorskip("selenium", reason="the browser test needs selenium: pip install -e '.[dev,app]'")
    shots = Path(os.environ.get("UNCLIP_APP_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    with AppProcess(tiny, tmp_path / "outputs", tmp_path / "app.log") as app:
        page = Page(app.url, tmp_path / "profile")
        try:
            assert "Pipeline:" in page.text() and "Licence:" in page.text()
            # bad input: no prompt, then a size the pipeline lacks; each a message in the page, no traceback
            page.click("#gen-run")
            assert "Traceback" not in page.wait_error("No prompt")
            page.close_toasts()
            page.type("#gen-prompt textarea", "a red circle")
            page.choose("#gen-size", "48")
            page.click("#gen-run")
            page.wait_error("Size 48 is not one this pipeline makes")
            page.close_toasts()
            # generate: two 32 px images, one candidate, 2 decoder steps set in the advanced fold
            srcs = generate_in_page(page)
            page.screenshot(shots / "app-generate.png")
            for i, src in enumerate(srcs):
                png = fetch(src, tmp_path / f"generated{i}.png")
                meta = read_png_metadata(png)
                assert Image.open(png).size == (32, 32) and Image.open(png).format == "PNG"
                assert meta["prompt"] == "a red circle" and json.loads(meta["seed"]) == i
                assert json.loads(meta["settings"])["decoder"]["steps"] == 2
            links = [a.get_attribute("href") for a in page.find_all("#gen-files a") if a.get_attribute("href")]
            assert read_png_metadata(fetch(links[0], tmp_path / "download.png"))["prompt"] == "a red circle"
            # inpaint the generated image with a mask painted with the brush
            srcs = inpaint(page, "a blue square", "32", 60, shots)
            meta = read_png_metadata(fetch(srcs[0], tmp_path / "inpainted.png"))
            assert meta["mode"] == "inpaint" and meta["prompt"] == "a blue square"
            mask = np.asarray(Image.open(fetch(page.images("#inp-mask")[0], tmp_path / "mask.png")).convert("L"))
            assert 0 < (mask == 255).mean() < 1  # the brush painted part of the image
            # the second generated image, clicked in the gallery, then sent to Variations
            srcs = variations(page, "16", 60, shots, pick=1)
            meta = read_png_metadata(fetch(srcs[0], tmp_path / "variation.png"))
            assert meta["mode"] == "variation" and meta["source"].endswith("a_red_circle_00001.png")
            interpolate(page, picture(tmp_path / "second.png"), "16", 60, shots)
            assert len(page.images("#int-files")) == 0 and len(page.find_all("#int-files a")) >= 5 + 1
            # an unreadable upload
            broken = tmp_path / "broken.png"
            broken.write_bytes(b"not an image")
            page.tab("Variations")
            page.find("#var-image button[aria-label='Clear']") and page.click("#var-image button[aria-label='Clear']")
            page.upload("#var-image", broken)
            page.click("#var-run")
            page.wait_error("Cannot read the uploaded image")
            assert page.requests_elsewhere() == []  # the page asked nothing of the internet
        finally:
            page.close()


def generate_in_page(page: Page) -> list[str]:
    from app_browser import generate

    return generate(page, "a red circle", "32", "2", 60, n="2")
