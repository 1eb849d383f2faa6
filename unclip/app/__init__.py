"""A web app over a pipeline folder: `python -m unclip.app [--pipeline DIR] [--host 127.0.0.1] [--port 7860]`
(needs the `app` extra: `pip install -e '.[app]'`). See docs/app.md.

    from unclip.app import App, build_app
    build_app(App(UnCLIPPipeline.from_pretrained("models/shapes"), "models/shapes")).queue().launch()
"""

from unclip.app.handlers import App
from unclip.app.ui import build_app

__all__ = ["App", "build_app"]
