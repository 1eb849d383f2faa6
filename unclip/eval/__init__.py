"""Evaluation of generated images: a network-free checker of `shapes` compositions and CLIP-based metrics
with an independent evaluator CLIP. Run it with `python -m unclip.eval {shapes,openmoji,variations,...}`.

    metrics         CLIP score, retrieval, Fréchet distance in CLIP space, the checker's accuracy
    shapes_checker  reads the objects of a `shapes` image and checks them against a prompt
    generation      a pipeline's images in batches, with the seeds one call gives them
    suites          evaluate_shapes, evaluate_variations, evaluate_openmoji
    resume          the log from which a killed `shapes` run resumes
    probes          what a CLIP and a decoder read from a caption
    prior           does the prior matter (DALL·E 2 §5.1)
    report          plain-text tables of the results
"""

from unclip.eval.metrics import clip_score, embedding_frechet_distance, retrieval_accuracy, shapes_accuracy
from unclip.eval.probes import probe_clip, probe_decoder_caption
from unclip.eval.report import format_table
from unclip.eval.shapes_checker import CheckResult, DetectedObject, check, detect, render_prompt, validate_checker
from unclip.eval.suites import evaluate_openmoji, evaluate_shapes, evaluate_variations

__all__ = [
    "CheckResult",
    "DetectedObject",
    "check",
    "clip_score",
    "detect",
    "embedding_frechet_distance",
    "evaluate_openmoji",
    "evaluate_shapes",
    "evaluate_variations",
    "format_table",
    "probe_clip",
    "probe_decoder_caption",
    "render_prompt",
    "retrieval_accuracy",
    "shapes_accuracy",
    "validate_checker",
]
