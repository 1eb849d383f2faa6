"""A seeded accuracy check of the bundled shapes pipeline at its defaults: a small run of the evaluation whose
figures the README and BENCHMARKS.md give (all right on 99.5% / 70.0% / 68.0% of 200 prompts per set).

    pytest -m slow tests/test_bundled_accuracy.py   # 60 prompts x 32 candidates: over an hour on 2 CPU cores

Floors for n = 20 prompts per set. The run is seeded, so on one machine it gives the same verdicts every time;
the floors allow for its 20 prompts being a draw from the set (and for another machine's arithmetic turning an
image or two). If the pipeline is as good as documented, the number right is Binomial(20, p):
- single, p = 0.995: fewer than 18 right has probability 1.3e-4;
- relational, p = 0.70 (held-out, p = 0.68): fewer than 8 right has probability 1.3e-3 (2.5e-3).
So the floors fail a pipeline as good as documented about 0.4% of the time. A test this small catches only large
losses: 9 times in 10 it fails a pipeline whose relational or held-out rate fell to 25%, or whose single-object
rate fell to 75%.
"""

from pathlib import Path

import pytest
import torch

from unclip.eval.__main__ import main as evaluate
from unclip.pipeline import DEFAULT_PIPELINE

N = 20
FLOORS = {"single": 0.90, "relational": 0.40, "held_out": 0.40}


@pytest.mark.slow
def test_bundled_shapes_pipeline_keeps_its_documented_accuracy():
    models = Path(DEFAULT_PIPELINE).parent
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size = 20 if device == "cuda" else 2  # on a CPU, small batches of 32 candidates are faster
    argv = ["shapes", "--pipeline", str(models / "shapes"), "--evaluator-clip", str(models / "evaluators/shapes_clip")]
    results = evaluate([*argv, "--n", str(N), "--seed", "0", "--batch-size", str(batch_size), "--device", device])
    sets = results["sets"]
    assert results["settings"]["candidates"] == 32  # the pipeline's default reranking
    assert sets["real"]["accuracy"] == 1.0  # the checker on ground-truth renders
    accuracy = {name: sets[name]["accuracy"] for name in FLOORS}
    assert all(accuracy[name] >= floor for name, floor in FLOORS.items()), accuracy
