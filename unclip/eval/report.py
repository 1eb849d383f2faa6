"""Plain-text tables of the results of `python -m unclip.eval`."""

from __future__ import annotations

COLUMNS = {  # result key -> (header, format); fractions are shown as percentages
    "n": ("n", "{:d}"),
    "accuracy": ("acc%", "pct"),
    "colors": ("color%", "pct"),
    "shapes": ("shape%", "pct"),
    "sizes": ("size%", "pct"),
    "relation": ("rel%", "pct"),
    "count": ("count%", "pct"),
    "relation_given_objects": ("rel|obj%", "pct"),
    "clip_score": ("clip", "{:.2f}"),
    "retrieval_image_to_text": ("R@1 i->t%", "pct"),
    "retrieval_text_to_image": ("R@1 t->i%", "pct"),
    "outside_exact": ("kept%", "pct"),
    "outside_exact_output": ("kept out%", "pct"),
    "outside_max_error": ("max err", "{:.2f}"),
}


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if fmt == "pct" else fmt.format(value)


def _align(table: list[list[str]]) -> list[str]:
    """Rows of cells as lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])
        for row in table
    ]


def format_table(results: dict) -> str:
    """A plain-text table of an `evaluate_*` result: one row per set, then the Fréchet distance."""
    rows = results["sets"]
    keys = [k for k in COLUMNS if any(k in row for row in rows.values())]
    table = [["set", *(COLUMNS[k][0] for k in keys)]]
    table += [[name, *(_cell(row.get(k), COLUMNS[k][1]) for k in keys)] for name, row in rows.items()]
    settings = ", ".join(f"{k}={v}" for k, v in results["settings"].items())
    lines = [f"{results['suite']} ({settings})", *_align(table)]
    if "clip_frechet_distance" in results:
        distance = results["clip_frechet_distance"]
        lines.append(f"clip_frechet_distance {distance:.4f}  ({results['clip_frechet_distance_note']})")
    if "candidate_curve" in results:
        curves = results["candidate_curve"]
        ks = list(next(iter(curves.values())))
        table = [["set", *(f"k={k} acc% (any%)" for k in ks)]]
        table += [
            [name, *(f"{_cell(c[k]['accuracy'], 'pct')} ({_cell(c[k]['any_correct'], 'pct')})" for k in ks)]
            for name, c in curves.items()
        ]
        lines += ["", f"reranking among the first k candidates ({results['candidate_curve_note']})", *_align(table)]
    return "\n".join(lines)


def format_probe(results: dict) -> str:
    """A plain-text table of `probe_clip`'s rates, in percent."""
    kinds = list(results["preferred_by_kind"])
    rows = [
        ["all", *kinds],
        [_cell(results["preferred"], "pct"), *(_cell(results["preferred_by_kind"][k], "pct") for k in kinds)],
    ]
    title = (
        f"true caption preferred over a wrong one, {results['n']} val scenes, {results['n_mismatched']} wrong "
        "captions (50% is chance)"
    )
    return "\n".join([title, *_align(rows)])


def format_caption_probe(results: dict) -> str:
    """A plain-text table of `probe_decoder_caption`: one row per kind of wrong caption."""
    change = results["prediction_change"]
    steps = list(change)
    table = [["wrong caption", *(f"t={t}" for t in steps)]]
    table += [[kind, *(f"{change[t][kind]:.4f}" for t in steps)] for kind in change[steps[0]]]
    title = (
        f"RMS change of the decoder's x0 prediction when its caption is wrong in one thing ({results['n']} val "
        f"scenes, {results['n_mismatched']} wrong captions{', no image embedding' if results['text_only'] else ''})"
    )
    return "\n".join([title, *_align(table)])


def format_validation(results: dict) -> str:
    """A plain-text table of `validate_checker`'s rates, in percent."""
    first = next(iter(results.values()))
    kinds = list(first["rejected_by_kind"])
    table = [["images", "accepted%", "rejected%", *kinds]]
    for name, r in results.items():
        rates = [r["accepted"], r["rejected"], *(r["rejected_by_kind"].get(k) for k in kinds)]
        table.append([name, *(_cell(v, "pct") for v in rates)])
    title = f"checker on {first['n']} val scenes: true captions accepted, {first['n_mismatched']} mismatched rejected"
    return "\n".join([title, *_align(table)])
