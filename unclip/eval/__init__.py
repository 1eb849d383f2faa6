"""Evaluation of generated images: a network-free checker of `shapes` compositions and CLIP-based metrics
with an independent evaluator CLIP. Run the suites with `python -m unclip.eval {shapes,openmoji,checker}`."""

from unclip.eval.metrics import (
    clip_score,
    embedding_frechet_distance,
    evaluate_openmoji,
    evaluate_shapes,
    format_table,
    retrieval_accuracy,
    shapes_accuracy,
)
from unclip.eval.shapes_checker import CheckResult, DetectedObject, check, detect, render_prompt, validate_checker

__all__ = [
    "CheckResult",
    "DetectedObject",
    "check",
    "clip_score",
    "detect",
    "embedding_frechet_distance",
    "evaluate_openmoji",
    "evaluate_shapes",
    "format_table",
    "render_prompt",
    "retrieval_accuracy",
    "shapes_accuracy",
    "validate_checker",
]
