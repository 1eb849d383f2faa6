"""The bundled pipeline loads and samples with the library as it is (a change that breaks old exports fails here)."""

from pathlib import Path

import torch
from safetensors import safe_open

from unclip.pipeline import DEFAULT_PIPELINE, UnCLIPPipeline


def test_bundled_shapes_pipeline_generates():
    assert Path(DEFAULT_PIPELINE).parts[-2:] == ("models", "shapes")
    pipe = UnCLIPPipeline.from_pretrained(DEFAULT_PIPELINE)
    assert pipe.sizes[:2] == [64, 256]
    out = pipe(["a red circle above a blue square"], seed=0, size=64, prior={"steps": 4}, decoder={"steps": 4})
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()


def test_bundled_weights_are_fp16():
    for weights in Path(DEFAULT_PIPELINE).glob("*/*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert "F32" not in dtypes, weights
