"""A web app over a pipeline folder: `python -m unclip.app [--pipeline DIR] [--host 127.0.0.1] [--port 7860]`
(needs the `app` extra: `pip install -e '.[app]'`). See docs/app.md.

    from unclip.app import App, build_app
    build_app(App(UnCLIPPipeline.from_pretrained("models/shapes"), "models/shapes")).queue().launch()
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry, no version check

__all__ = ["App", "build_app"]


def __getattr__(name):
    # imported on use, so that `python -m unclip.app` can say how to install gradio when it is missing
    if name == "App":
        from unclip.app.handlers import App

        return App
    if name == "build_app":
        from unclip.app.ui import build_app

        return build_app
    raise AttributeError(f"module 'unclip.app' has no attribute {name!r}")
