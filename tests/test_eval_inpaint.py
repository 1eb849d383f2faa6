"""The inpainting suite (`python -m unclip.eval inpaint`) and the inpainting decoder's training masks."""

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import make_tiny_pipeline

from unclip.data.shapes import ShapesDataset, box_mask, parse_caption, render_scene, satisfies
from unclip.eval.inpaint import EDITS, evaluate_inpaint, inpaint_cases
from unclip.imageio import from_pil
from unclip.outputs import EditOutput
from unclip.pipeline import UnCLIPPipeline
from unclip.tasks.decoder import training_masks


def test_cases_change_one_object_as_their_kind_says():
    cases = inpaint_cases(40, seed=3)
    assert [c.edit for c in cases[:8]] == [*EDITS, *EDITS]
    for case in cases:
        old = case.source.objects[case.index]
        assert satisfies(case.target, parse_caption(case.caption))
        if case.edit == "remove":
            assert len(case.source.objects) == 2 and len(case.target.objects) == 1 and case.region is None
            assert case.target.objects[0] == case.source.objects[1 - case.index]
            continue
        new = case.target.objects[case.index]
        assert (new.color != old.color, new.shape != old.shape) == {
            "colour": (True, False),
            "shape": (False, True),
            "both": (True, True),
        }[case.edit]
        assert (new.size, new.cx, new.cy) == (old.size, old.cx, old.cy)
        assert case.region == f"a {new.color} {new.shape}"
        others = [o for i, o in enumerate(case.source.objects) if i != case.index]
        assert list(case.target.objects[: case.index] + case.target.objects[case.index + 1 :]) == others
    assert inpaint_cases(40, seed=3) == cases and inpaint_cases(40, seed=4) != cases


@pytest.mark.parametrize("size", [64, 256])
def test_the_mask_covers_every_pixel_of_the_edited_object(size):
    for case in inpaint_cases(12):
        alone = case.source.__class__((case.source.objects[case.index],))
        drawn = (np.asarray(render_scene(alone, size)) != 255).any(-1)
        mask = case.mask(size)
        assert drawn.any() and not (drawn & ~mask).any()
        assert mask.sum() < 0.5 * size * size


class FakeInpainter:
    """A stand-in pipeline: paints each case's target inside the mask ("perfect") or keeps the source."""

    sizes = [64]
    candidates = 1

    def __init__(self, perfect: bool):
        self.perfect = perfect
        self.targets = {c.caption: c.target for c in inpaint_cases(8)}

    def inpaint(self, source, mask, prompt, *, n, seed, size, method, candidates, decoder):
        x = from_pil(source)
        if self.perfect:
            keep = torch.from_numpy(np.asarray(mask) == 0)
            x = torch.where(keep, x, from_pil(render_scene(self.targets[prompt], size)))
        meta = [{"settings": {"candidates": candidates, "decoder": {"method": method}}}]
        return EditOutput(x[None], torch.zeros(1, 4), ["x"], meta, "x")


def test_the_suite_tells_a_perfect_inpainter_from_one_that_changes_nothing():
    good = evaluate_inpaint(FakeInpainter(perfect=True), n=8)
    assert good["sets"]["all"]["n"] == 8 and good["sets"]["all"]["accuracy"] == 1.0
    assert good["sets"]["all"]["outside_exact"] == 1.0 and good["sets"]["all"]["outside_max_error"] == 0.0
    assert {k: v["n"] for k, v in good["sets"].items()} == {"all": 8, **dict.fromkeys(EDITS, 2)}
    lazy = evaluate_inpaint(FakeInpainter(perfect=False), n=8)
    assert lazy["sets"]["all"]["accuracy"] == 0.0 and lazy["sets"]["all"]["outside_exact"] == 1.0
    region = evaluate_inpaint(FakeInpainter(perfect=False), n=8, phrasing="region")
    assert region["settings"]["cases"] == 6 and "remove" not in region["sets"]
    with pytest.raises(ValueError, match="phrasing"):
        evaluate_inpaint(FakeInpainter(perfect=True), n=2, phrasing="mask")


def test_the_suite_runs_a_real_pipeline_and_finds_the_known_region_kept(tmp_path):
    pipe = UnCLIPPipeline.from_pretrained(make_tiny_pipeline(tmp_path / "pipe", inpaint=True))
    results = evaluate_inpaint(pipe, n=4, size=32, decoder={"steps": 2})
    row = results["sets"]["all"]
    assert row["n"] == 4 and results["settings"]["method"] == "auto"
    assert results["settings"]["decoder"]["method"] == "model"
    assert row["outside_exact"] == 1.0 and row["outside_exact_output"] == 1.0  # at 16 and at 32 px


def test_training_masks_cover_an_object_box_the_whole_image_or_a_random_region():
    data = ShapesDataset(32, two_object_prob=1.0)
    scenes = [data[i]["scene"] for i in range(200)]
    masks = training_masks(scenes, 32, torch.Generator().manual_seed(0))
    assert masks.shape == (200, 1, 32, 32) and set(masks.unique().tolist()) == {0.0, 1.0}
    whole = masks.flatten(1).min(1).values == 1
    boxes = [
        any(
            (m := box_mask(b, 32, 0.0)).sum() <= masks[i, 0].sum() <= box_mask(b, 32, 0.08).sum()
            and masks[i, 0][torch.from_numpy(m)].all()
            for b in (data.scene(i)[0].objects[k].box for k in range(2))
        )
        for i in range(200)
    ]
    assert 0.02 < whole.float().mean() < 0.1
    assert 0.3 < np.mean(boxes) < 0.55  # OBJECT_BOX_PROB of 0.4, and a few random masks that happen to fit
    plain = training_masks([{}] * 100, 32, torch.Generator().manual_seed(0))  # data without objects
    assert (plain.flatten(1).min(1).values == 1).float().mean() < 0.15
    torch.testing.assert_close(training_masks(scenes, 32, torch.Generator().manual_seed(0)), masks)


def test_box_mask_grows_by_the_margin():
    mask = box_mask((0.25, 0.5, 0.5, 0.75), 8)
    assert mask.sum() == 4 and mask[4:6, 2:4].all()
    assert box_mask((0.25, 0.5, 0.5, 0.75), 8, margin=0.125).sum() == 16
    assert box_mask((0.0, 0.0, 1.0, 1.0), 8, margin=0.5).all()  # clipped to the canvas
    Image.fromarray(mask)  # a plain bool array that PIL reads as a mask


def test_a_killed_run_resumes_from_its_log(tmp_path):
    log = tmp_path / "out.json.partial.jsonl"
    whole = evaluate_inpaint(FakeInpainter(perfect=True), n=8, resume=log)
    lines = log.read_text().splitlines()
    assert len(lines) == 9  # the settings, then one line per edit
    log.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # killed while writing edit 5
    pipe = FakeInpainter(perfect=True)
    calls = []
    inpaint = pipe.inpaint
    pipe.inpaint = lambda *a, **k: calls.append(a[2]) or inpaint(*a, **k)
    assert evaluate_inpaint(pipe, n=8, resume=log) == whole
    assert len(calls) == 4  # edits 4-7
    with pytest.raises(ValueError, match="other settings"):
        evaluate_inpaint(pipe, n=8, phrasing="region", resume=log)


def test_the_command_writes_json_and_drops_its_log(tmp_path, monkeypatch, capsys):
    import json

    import unclip.eval.__main__ as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *args: FakeInpainter(perfect=True))
    out = tmp_path / "inpaint.json"
    cli.main(["inpaint", "--pipeline", "anything", "--n", "4", "--candidates", "1", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["suite"] == "inpaint" and results["sets"]["all"]["accuracy"] == 1.0
    assert not (tmp_path / "inpaint.json.partial.jsonl").exists()
    assert "kept%" in capsys.readouterr().out
