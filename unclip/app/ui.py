"""The web app's page: four tabs (Generate, Variations, Inpaint, Interpolate) over one loaded pipeline, and an
about line naming the pipeline, its model card and its licence. `build_app(App(...))` returns the gr.Blocks."""

from __future__ import annotations

import dataclasses

import gradio as gr

from unclip.app.handlers import App
from unclip.diffusion import SAMPLERS

# every event that runs the pipeline shares this concurrency group, limited to 1: one generation at a time
PIPELINE = {"concurrency_id": "pipeline", "concurrency_limit": 1}


def readable(component):
    """`component` (an image input), whose unreadable uploads get a message in the page rather than gradio's bare
    "Error". Its instance's preprocess is wrapped: a subclass of a gradio component would make gradio write a
    .pyi file beside this module."""
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception as e:
            raise gr.Error(
                f"Cannot read the uploaded image: it is not an image file ({e})", print_exception=False
            ) from None

    component.preprocess = checked
    return component


def image_input(label: str, elem_id: str) -> gr.Image:
    # type filepath and image_mode None: the handler reads the uploaded file itself, unchanged (no re-encoding)
    return readable(gr.Image(label=label, type="filepath", image_mode=None, format="png", elem_id=elem_id, height=256))


def about_markdown(app: App) -> str:
    info = app.info
    parts = [f"**Pipeline:** `{app.folder}` (sizes {', '.join(map(str, app.pipe.sizes))} px, on {app.pipe.device})"]
    if info["card"]:
        parts.append(f"[model card](/gradio_api/file={info['card']})")
    parts.append(f"**Licence:** {info['licence'] or 'see the model card'}")
    text = " · ".join(parts)
    if info["attribution"]:
        text += f"  \n{info['attribution']}"
    return text


def size_dropdown(app: App, elem_id: str) -> gr.Dropdown:
    sizes = [str(s) for s in app.pipe.sizes]
    return gr.Dropdown(sizes, value=sizes[0], label="size (px)", allow_custom_value=True, elem_id=elem_id)


def settings_fold(app: App, prefix: str, stages: list[str]) -> dict[str, gr.components.Component]:
    """Number boxes (a dropdown for the sampler) for the given stages' settings at the pipeline's defaults;
    keys "stage.field"."""
    boxes = {}
    for stage in stages:
        defaults = app.stage_defaults(stage)
        if defaults is None:
            continue
        with gr.Row():
            for f in dataclasses.fields(defaults):
                value, key = getattr(defaults, f.name), f"{stage}.{f.name}"
                label, elem_id = f"{stage} {f.name.replace('_', ' ')}", f"{prefix}-{stage}-{f.name}"
                if f.name == "sampler":
                    boxes[key] = gr.Dropdown(list(SAMPLERS), value=value, label=label, elem_id=elem_id)
                else:
                    precision = None if isinstance(value, float) else 0
                    boxes[key] = gr.Number(value, label=label, precision=precision, elem_id=elem_id)
    return boxes


def build_app(app: App) -> gr.Blocks:
    pipe = app.pipe
    with gr.Blocks(title=f"unclip · {app.name}", analytics_enabled=False) as demo:
        gr.Markdown(f"# unclip · `{app.name}`\nText to image with unCLIP (DALL·E 2): prior, decoder, upsamplers.")
        selected = gr.State(None)  # the Generate gallery's selected image path
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    prompt = gr.Textbox(
                        label="prompt", placeholder="a red circle above a blue square", scale=4, elem_id="gen-prompt"
                    )
                    go = gr.Button("Generate", variant="primary", scale=1, elem_id="gen-run")
                with gr.Row():
                    n = gr.Slider(1, 16, value=1, step=1, label="images", elem_id="gen-n")
                    seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="gen-seed")
                    size = size_dropdown(app, "gen-size")
                with gr.Accordion("advanced", open=False, elem_id="gen-advanced"):
                    with gr.Row():
                        candidates = gr.Number(
                            app.defaults.candidates,
                            label="candidates (keep the best by CLIP score)",
                            precision=0,
                            minimum=1,
                            elem_id="gen-candidates",
                        )
                        use_prior = gr.Checkbox(pipe.prior is not None, label="use the prior", elem_id="gen-prior")
                    gen_boxes = settings_fold(app, "gen", ["prior", "decoder", *[s.folder for s in pipe.upsamplers]])
                gallery = gr.Gallery(
                    label="images (click one to select it)",
                    columns=4,
                    height=360,
                    object_fit="contain",
                    fit_columns=False,
                    interactive=False,
                    buttons=["download", "fullscreen"],
                    elem_id="gen-gallery",
                )
                gen_files = gr.File(
                    label="PNG files (prompt, seed and settings in their metadata)",
                    file_count="multiple",
                    interactive=False,
                    elem_id="gen-files",
                )
                with gr.Row():
                    to_var = gr.Button("use as input: Variations", size="sm", elem_id="to-variations")
                    to_inp = gr.Button("use as input: Inpaint", size="sm", elem_id="to-inpaint")
                    to_int = gr.Button("use as input: Interpolate", size="sm", elem_id="to-interpolate")

            with gr.Tab("Variations", id="variations"):
                with gr.Row():
                    var_image = image_input("image (upload, or use one from Generate)", "var-image")
                    var_gallery = gr.Gallery(
                        label="variations",
                        columns=4,
                        height=360,
                        object_fit="contain",
                        fit_columns=False,
                        interactive=False,
                        elem_id="var-gallery",
                    )
                with gr.Row():
                    var_n = gr.Slider(1, 16, value=4, step=1, label="images", elem_id="var-n")
                    var_seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="var-seed")
                    var_size = size_dropdown(app, "var-size")
                    var_fresh = gr.Checkbox(
                        False, label="fresh noise (instead of the image's inverted latent)", elem_id="var-fresh"
                    )
                    var_go = gr.Button("Make variations", variant="primary", elem_id="var-run")
                with gr.Accordion("advanced", open=False):
                    with gr.Row():
                        var_eta = gr.Slider(0, 1, value=0.5, step=0.05, label="DDIM eta (inverted: 0 = the image)")
                        var_steps = gr.Number(
                            None,
                            label="steps (inversion steps, or decoder steps with fresh noise; empty: default)",
                            precision=0,
                        )
                        var_guidance = gr.Number(None, label="decoder guidance scale (empty: default)")
                var_files = gr.File(label="PNG files", file_count="multiple", interactive=False, elem_id="var-files")

            with gr.Tab("Inpaint", id="inpaint"):
                with gr.Row():
                    editor = gr.ImageEditor(
                        label="image: paint over the part to repaint",
                        type="pil",
                        image_mode="RGBA",
                        format="png",
                        brush=gr.Brush(colors=[("#ff00ff", 0.6), "#ffffff", "#000000"], color_mode="defaults"),
                        transforms=(),
                        layers=False,
                        height=420,
                        elem_id="inp-editor",
                    )
                    readable(editor)
                    with gr.Column():
                        inp_mask_shown = gr.Image(
                            label="mask used (white = repaint)", height=200, interactive=False, elem_id="inp-mask"
                        )
                        inp_gallery = gr.Gallery(
                            label="results",
                            columns=4,
                            height=360,
                            object_fit="contain",
                            fit_columns=False,
                            interactive=False,
                            elem_id="inp-gallery",
                        )
                with gr.Row():
                    inp_prompt = gr.Textbox(
                        label="caption of the whole image you want (kept part included)", scale=3, elem_id="inp-prompt"
                    )
                    inp_go = gr.Button("Inpaint", variant="primary", elem_id="inp-run")
                with gr.Row():
                    inp_n = gr.Slider(1, 16, value=1, step=1, label="images", elem_id="inp-n")
                    inp_seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="inp-seed")
                    inp_size = size_dropdown(app, "inp-size")
                with gr.Accordion("advanced", open=False):
                    inp_upload = image_input("or upload a mask (white = repaint; the image's size)", "inp-upload")
                    method = gr.Radio(
                        ["auto", "model", "repaint"],
                        value="auto",
                        label="method (auto: the inpainting decoder if the pipeline has one, else RePaint)",
                    )
                    inp_boxes = settings_fold(app, "inp", ["prior", "decoder"])
                inp_files = gr.File(label="PNG files", file_count="multiple", interactive=False, elem_id="inp-files")

            with gr.Tab("Interpolate", id="interpolate"):
                with gr.Row():
                    int_image = image_input("first image", "int-image")
                    with gr.Column():
                        mode = gr.Radio(
                            ["second image", "caption edit"], value="second image", label="toward", elem_id="int-mode"
                        )
                        int_image2 = image_input("second image", "int-image2")
                        from_caption = gr.Textbox(label="caption edit: from (what the image shows)", visible=False)
                        to_caption = gr.Textbox(label="caption edit: to", visible=False)
                with gr.Row():
                    int_steps = gr.Slider(2, 12, value=5, step=1, label="frames", elem_id="int-steps")
                    int_theta = gr.Slider(
                        0.05, 1, value=0.5, step=0.05, label="how far (max θ)", visible=False, elem_id="int-theta"
                    )
                    int_seed = gr.Number(0, label="seed", precision=0, minimum=0)
                    int_size = size_dropdown(app, "int-size")
                    int_fresh = gr.Checkbox(False, label="fresh noise (instead of the inverted latents)")
                    int_go = gr.Button("Interpolate", variant="primary", elem_id="int-run")
                int_strip = gr.Image(label="strip", interactive=False, elem_id="int-strip")
                int_files = gr.File(
                    label="PNG files (frames, then the strip)",
                    file_count="multiple",
                    interactive=False,
                    elem_id="int-files",
                )
        gr.Markdown(about_markdown(app), elem_id="about")

        # -- events ------------------------------------------------------------------------------------------

        def run_generate(prompt, n, seed, size, candidates, use_prior, *values, progress=gr.Progress()):  # noqa: B008 (gradio's idiom)
            advanced = dict(zip(gen_boxes, values, strict=True))
            for paths in app.generate(prompt, n, seed, size, candidates, use_prior, advanced, progress):
                yield paths, paths, None

        go.click(
            run_generate,
            [prompt, n, seed, size, candidates, use_prior, *gen_boxes.values()],
            [gallery, gen_files, selected],
            **PIPELINE,
        )
        prompt.submit(
            run_generate,
            [prompt, n, seed, size, candidates, use_prior, *gen_boxes.values()],
            [gallery, gen_files, selected],
            **PIPELINE,
        )

        def select(evt: gr.SelectData):
            return evt.value["image"]["path"] if isinstance(evt.value, dict) else evt.value

        gallery.select(select, None, selected)

        def chosen(path, files):
            path = path or (files[0] if files else None)
            if not path:
                raise gr.Error("Generate an image first, then click it in the gallery to select it")
            return path

        to_var.click(
            lambda p, f: (chosen(p, f), gr.Tabs(selected="variations")), [selected, gen_files], [var_image, tabs]
        )
        to_inp.click(lambda p, f: (chosen(p, f), gr.Tabs(selected="inpaint")), [selected, gen_files], [editor, tabs])
        to_int.click(
            lambda p, f: (chosen(p, f), gr.Tabs(selected="interpolate")), [selected, gen_files], [int_image, tabs]
        )

        def run_variations(*args):
            paths = app.variations(*args)
            return paths[: int(args[1])], paths

        var_go.click(
            run_variations,
            [var_image, var_n, var_seed, var_size, var_fresh, var_eta, var_steps, var_guidance],
            [var_gallery, var_files],
            **PIPELINE,
        )

        def run_inpaint(editor, upload, prompt, n, seed, size, method, *values):
            paths, mask = app.inpaint(
                editor, upload, prompt, n, seed, size, method, dict(zip(inp_boxes, values, strict=True))
            )
            return paths[: int(n)], paths, mask

        inp_go.click(
            run_inpaint,
            [editor, inp_upload, inp_prompt, inp_n, inp_seed, inp_size, method, *inp_boxes.values()],
            [inp_gallery, inp_files, inp_mask_shown],
            **PIPELINE,
        )

        def show_mode(mode):
            text = mode == "caption edit"
            return (
                gr.Image(visible=not text),
                gr.Textbox(visible=text),
                gr.Textbox(visible=text),
                gr.Slider(visible=text),
            )

        mode.change(show_mode, mode, [int_image2, from_caption, to_caption, int_theta])

        def run_interpolate(*args):
            frames, strip = app.interpolate(*args)
            return strip, [*frames, strip]

        int_go.click(
            run_interpolate,
            [
                int_image,
                mode,
                int_image2,
                from_caption,
                to_caption,
                int_steps,
                int_theta,
                int_seed,
                int_size,
                int_fresh,
            ],
            [int_strip, int_files],
            **PIPELINE,
        )
    return demo
