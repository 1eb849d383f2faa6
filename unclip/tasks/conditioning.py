"""CLIP conditioning for training batches, shared by the prior, decoder and upsampler tasks.

Embeddings are L2-normalised everywhere (CLIP's contrastive space, and clip-retrieval's stored format), so
that precomputed shards, on-the-fly encoding and the sampling pipeline agree. Per-token text encodings are
the text transformer's final hidden states and are not normalised.
"""

from __future__ import annotations

import torch

from unclip.clip import ClipAdapter
from unclip.config import ClipConfig


def load_clip(config: ClipConfig, device: torch.device | str = "cpu") -> ClipAdapter:
    if not (config.checkpoint or config.model_config or config.model_name):
        raise ValueError(
            "this run needs a CLIP: set clip.checkpoint (a folder written by train/clip.py), "
            "clip.model_name with clip.pretrained, or clip.model_config"
        )
    return ClipAdapter.from_config(config, device=device)


def check_clip_dims(clip: ClipAdapter | None, *, clip_dim: int | None, text_width: int | None, text_ctx=None):
    """A clear error when the network's conditioning widths do not match the CLIP's."""
    if clip is None:
        return
    problems = []
    if clip_dim and clip_dim != clip.embed_dim:
        problems.append(f"model.clip_dim is {clip_dim} but the CLIP's embeddings have {clip.embed_dim} dims")
    if text_width and text_width != clip.text_width:
        problems.append(f"model.text_width is {text_width} but the CLIP's token encodings are {clip.text_width} wide")
    if text_ctx and text_ctx < clip.context_length:
        problems.append(f"model.text_ctx is {text_ctx} but the CLIP's context length is {clip.context_length}")
    if problems:
        raise ValueError(
            "the model does not fit its CLIP: " + "; ".join(problems) + ". Fix the config's model section."
        )
