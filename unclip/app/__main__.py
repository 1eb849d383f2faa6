"""python -m unclip.app: serve the web app on a pipeline folder (the bundled models/shapes by default)."""

from __future__ import annotations

import argparse
import signal
import sys

from unclip.cli import DTYPE_CHOICES, DTYPE_HELP, resolve_dtype


def parse_args(argv=None) -> argparse.Namespace:
    from unclip.pipeline import DEFAULT_PIPELINE

    p = argparse.ArgumentParser(
        prog="python -m unclip.app",
        description="A web app for text to image, variations, inpainting and interpolation on a pipeline folder.",
        epilog="By default the app is reachable from this machine only. To open it to your network, use "
        "--host 0.0.0.0 (anyone who can reach the port can use it); --share makes a temporary public "
        "gradio.live link (it needs the internet).",
    )
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="pipeline folder (default: the bundled models/shapes)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (needs the internet)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    p.add_argument("--out", default=None, help="folder to keep the PNGs in (default: a temporary folder)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait for the pipeline (default 16)")
    return p.parse_args(argv)


def port_problem(host: str, port: int) -> str | None:
    """Why the app cannot listen on host:port (checked before the pipeline is loaded), or None."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        return f"cannot listen on {host}:{port} ({e.strerror}); choose another port with --port"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = port_problem(args.host, args.port)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("the web app needs gradio: pip install -e '.[app]'", file=sys.stderr)
        return 2
    from pathlib import Path

    from unclip.app import App, build_app
    from unclip.pipeline import UnCLIPPipeline

    try:
        dtype = resolve_dtype(args.dtype, args.device)
        pipe = UnCLIPPipeline.from_pretrained(args.pipeline, device=args.device, dtype=dtype)
    except (OSError, ValueError) as e:
        print(f"cannot load the pipeline {args.pipeline}: {e}", file=sys.stderr)
        return 2
    app = App(pipe, Path(args.pipeline).resolve(), args.out)
    demo = build_app(app)
    # one pipeline call at a time (every pipeline event is in one concurrency group of 1); others wait in the queue
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    where = "this machine only" if args.host in ("127.0.0.1", "localhost", "::1") else f"interface {args.host}"
    print(f"unclip app: pipeline {app.folder}, outputs in {app.out}")
    print(f"serving on http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port} ({where})")
    if not args.share and where.endswith("only"):
        print("to share it: --host 0.0.0.0 (your network) or --share (a public gradio.live link)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop as on Ctrl-C: the temporary folder is removed
    allowed = [app.info["card"]] if app.info["card"] else None
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        allowed_paths=allowed,
        show_error=False,
        footer_links=["gradio"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
