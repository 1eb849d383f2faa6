"""How early the reranking can drop candidates: CLIP scores of every candidate's x0 prediction at every step.

The pipeline reranks N candidates by its CLIP after sampling each in full (N·S decoder evaluations). If the
prediction of x0 part way through a candidate's own trajectory already tells the good candidates from the bad,
the bad can stop there and only the kept ones run on: with a deterministic sampler the kept candidates end as
the very images a full run makes, so a pruned run picks among the same images at a fraction of the cost.

For the first `--n` prompts of an evaluation set (the prompts and seeds `python -m unclip.eval shapes` gives
them), this samples every candidate in full at the pipeline's defaults, records the pipeline CLIP's score of each
candidate's x0 prediction after every decoder step, and checks each final image with the shapes checker. One
line per prompt goes to `--out` (JSON lines; a rerun skips the prompts already there). `--schedules` then
replays pruning schedules on those records: "8:8,16:2" keeps the best 8 by their step-8 scores, then the best 2
at step 16, then the best at the end; it reports the checker's accuracy of the kept images and the decoder
evaluations per image, beside the full reranking's.

    OMP_NUM_THREADS=1 python bench/candidate_pruning.py --pipeline models/shapes --set relational --n 100 \\
        --out runs/bench/pruning_relational.jsonl
    OMP_NUM_THREADS=1 python bench/candidate_pruning.py --pipeline models/shapes --set relational --n 100 \\
        --steps 12 --prior-steps 10 --out runs/bench/pruning_relational_12.jsonl    # fewer steps
    python bench/candidate_pruning.py --out runs/bench/pruning_relational.jsonl --schedules 8:8,16:2 5:4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import load_pipeline  # noqa: E402
from unclip.data.shapes import prompt_sets  # noqa: E402
from unclip.eval.shapes_checker import check  # noqa: E402
from unclip.sampling import check_pruning  # noqa: E402

SETS = ("single", "relational", "held_out")


def resolve(pipe, seed: int = 0, candidates: int | None = None, steps: dict[str, int | None] | None = None):
    """The pipeline's call settings with `steps` ({"prior": 10, "decoder": 12}; None keeps the default)."""
    steps = steps or {}
    return pipe.resolve(
        seed=seed,
        candidates=candidates,
        prior={"steps": steps["prior"]} if steps.get("prior") else None,
        decoder={"steps": steps["decoder"]} if steps.get("decoder") else None,
    )


def record(pipe, prompt: str, seeds: list[int], steps: dict[str, int | None] | None = None) -> dict:
    """Every candidate of one prompt sampled in full: scores[k][j] is the pipeline CLIP's score of candidate j's
    x0 prediction after step k + 1 (the last row scores the final images, as the reranking does), correct[j]
    the checker's verdict on candidate j's final image. `steps` overrides the prior's and the decoder's steps
    ({"prior": 10, "decoder": 12}); the row records the steps used."""
    call = resolve(pipe, seeds[0], len(seeds), steps)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    many = [prompt] * len(seeds)
    text = pipe.encode_text(many)
    image_embed = pipe.prior_embeds(text, generators, call.prior)
    x0s: list[torch.Tensor] = []
    pipe.step_callback = lambda stage, images=None: lambda info: x0s.append(info["x0"].float().clamp(-1, 1))
    try:
        images = pipe.decode(image_embed, text, generators, call.decoder, prompts=many)
    finally:
        del pipe.step_callback
    scores = [pipe.clip_scores(x0, text.embed) for x0 in x0s[:-1]]
    scores.append(pipe.clip_scores(images, text.embed))
    scores = [[round(v, 5) for v in row.tolist()] for row in scores]
    correct = [check(image, prompt).correct for image in images.cpu()]
    used = {"prior": call.prior.steps, "decoder": call.decoder.steps}
    row = {"prompt": prompt, "seeds": seeds, "steps": used, "sampler": call.decoder.sampler}
    return {**row, "scores": scores, "correct": correct}


def parse_schedule(text: str) -> tuple[tuple[int, int], ...]:
    """ "8:8,16:2" -> ((8, 8), (16, 2)), checked as the pipeline's `pruning` setting ("" keeps all to the end)."""
    try:
        return check_pruning(text)
    except ValueError as e:
        raise SystemExit(f"bad schedule: {e}") from None


def replay(row: dict, stages: list[tuple[int, int]]) -> tuple[bool, int]:
    """The kept candidate's checker verdict under a pruning schedule, and the decoder evaluations it costs."""
    scores = torch.tensor(row["scores"])  # (steps, candidates)
    steps, n = scores.shape
    alive = list(range(n))
    cost, done = 0, 0
    for step, keep in stages:
        step = min(step, steps)
        cost += len(alive) * (step - done)
        done = step
        ranked = sorted(alive, key=lambda j: -scores[step - 1, j].item())
        alive = ranked[: min(keep, len(alive))]
    cost += len(alive) * (steps - done)
    best = max(alive, key=lambda j: scores[-1, j].item())
    return row["correct"][best], cost


def report(rows: list[dict], schedules: list[str]) -> None:
    steps = len(rows[0]["scores"])
    n = len(rows[0]["correct"])
    prior = rows[0].get("steps", {}).get("prior")
    print(f"{len(rows)} prompts, {n} candidates, {steps} decoder steps" + (f", {prior} prior steps" if prior else ""))
    any_right = sum(any(r["correct"]) for r in rows) / len(rows)
    right = sum(sum(r["correct"]) for r in rows) / (len(rows) * n)
    print(f"candidates right: {right:.1%}")
    print(f"{'schedule':<24} {'all right':>9} {'evaluations':>11}")
    print(f"{'(oracle: any candidate)':<24} {any_right:>9.1%} {n * steps:>11}")
    for text in ["", *schedules]:
        results = [replay(r, parse_schedule(text)) for r in rows]
        accuracy = sum(ok for ok, _ in results) / len(results)
        cost = sum(c for _, c in results) / len(results)
        print(f"{text or '(full reranking)':<24} {accuracy:>9.1%} {cost:>11.0f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", help="a shapes pipeline folder; without it, only replay --out's records")
    parser.add_argument("--set", default="relational", choices=SETS, help="evaluation set (default %(default)s)")
    parser.add_argument(
        "--n", type=int, default=100, help="the first N prompts of the set, recorded or replayed (default %(default)s)"
    )
    parser.add_argument("--eval-n", type=int, default=200, help="the eval's prompts per set, which fix the seeds")
    parser.add_argument("--seed", type=int, default=0, help="the eval's seed (default %(default)s)")
    parser.add_argument("--candidates", type=int, help="default the pipeline's")
    parser.add_argument("--steps", type=int, help="decoder steps (default the pipeline's)")
    parser.add_argument("--prior-steps", type=int, help="prior steps (default the pipeline's)")
    parser.add_argument("--out", required=True, help="JSON lines, one per prompt; resumed if it exists")
    parser.add_argument("--schedules", nargs="*", default=[], help="STEP:KEEP,... pruning schedules to replay")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if args.pipeline:
        pipe = load_pipeline(args.pipeline)
        c = args.candidates or pipe.candidates
        prompts = getattr(prompt_sets(args.eval_n, args.seed), args.set)[: args.n]
        first = args.seed + SETS.index(args.set) * args.eval_n * c  # as evaluate_shapes seeds the set
        steps = {"prior": args.prior_steps, "decoder": args.steps}
        made = {tuple(sorted(r["steps"].items())) for r in rows if "steps" in r}
        call = resolve(pipe, steps=steps)
        wanted = (("decoder", call.decoder.steps), ("prior", call.prior.steps))
        if made - {wanted}:
            raise SystemExit(f"{out} holds records made at other steps ({sorted(made)}); write to another --out")
        out.parent.mkdir(parents=True, exist_ok=True)
        for i in range(len(rows), len(prompts)):
            row = record(pipe, prompts[i], list(range(first + i * c, first + (i + 1) * c)), steps)
            with out.open("a") as f:  # one line per prompt: a killed run keeps what it made
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            print(f"{i + 1}/{len(prompts)} {prompts[i]!r}: {sum(row['correct'])} of {c} right", flush=True)
    if not rows:
        raise SystemExit(f"{out} holds no records; make them with --pipeline")
    report(rows[: args.n], args.schedules)


if __name__ == "__main__":
    main()
