import io
import itertools
import tarfile

import pytest
import torch
from PIL import Image

from unclip.config import DataConfig
from unclip.data import build_dataset
from unclip.data.images import (
    CsvDataset,
    ImageFolderDataset,
    WebDataset,
    expand_urls,
    load_image,
    split_shards,
)

COLOURS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]


def encode(colour, fmt="PNG", size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def rgba_png() -> bytes:
    image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # transparent, with an opaque red centre
    image.paste((255, 0, 0, 255), (5, 5, 15, 15))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        (root / f"{i}.{ext}").write_bytes(encode(colour, fmt))
        (root / f"{i}.txt").write_text(f"colour {i}\n")
    (root / "sub" / "alpha.png").write_bytes(rgba_png())
    (root / "sub" / "alpha.txt").write_text("alpha")
    (root / "bad.jpg").write_bytes(b"not a jpeg at all")
    (root / "bad.txt").write_text("bad")
    (root / "uncaptioned.png").write_bytes(encode((0, 0, 0)))
    return root


def test_preprocessing_resizes_crops_and_composites(tmp_path):
    image = load_image(io.BytesIO(encode((10, 20, 30), size=(40, 20))), 8)
    assert image.size == (8, 8) and image.mode == "RGB" and image.getpixel((4, 4)) == (10, 20, 30)
    alpha = load_image(io.BytesIO(rgba_png()), 20)
    assert alpha.getpixel((0, 0)) == (255, 255, 255) and alpha.getpixel((10, 10)) == (255, 0, 0)


def test_folder_items_and_skipping(folder):
    dataset = ImageFolderDataset(folder, 8, low_res_size=4, val_size=0)
    assert len(dataset) == 7  # 5 + alpha + bad; the uncaptioned image is left out
    items = [dataset[i] for i in range(len(dataset))]
    assert dataset.num_skipped == 1
    assert all(item["image"].shape == (3, 8, 8) and item["low_res"].shape == (3, 4, 4) for item in items)
    assert all(-1 <= item["image"].min() and item["image"].max() <= 1 for item in items)
    captions = [item["caption"] for item in items]
    assert "bad" not in captions and "colour 0" in captions and "alpha" in captions
    alpha = items[captions.index("alpha")]["image"]
    torch.testing.assert_close(alpha[:, 0, 0], torch.ones(3))  # transparency composited onto white
    assert len(ImageFolderDataset(folder, 8, val_size=0, allow_missing_captions=True)) == 8


def test_folder_splits_are_disjoint(folder):
    train, val = (
        ImageFolderDataset(folder, 8, val_size=2),
        ImageFolderDataset(folder, 8, val_size=2, split="val"),
    )
    assert len(val) == 2 and len(train) == 5
    assert not {p for p, _ in train.entries} & {p for p, _ in val.entries}
    assert val.entries == ImageFolderDataset(folder, 8, val_size=2, split="val").entries


def test_empty_and_all_bad(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "a.png").write_bytes(b"broken")
    (tmp_path / "a.txt").write_text("a")
    with pytest.raises(ValueError, match="every image in .* failed"):
        ImageFolderDataset(tmp_path, 8, val_size=0)[0]


def test_csv(folder):
    (folder / "list.csv").write_text('filepath,text\n0.png,"first, red"\nsub/alpha.png,alpha\nbad.jpg,bad\n')
    dataset = CsvDataset(folder / "list.csv", 8, val_size=0)
    assert [dataset[i]["caption"] for i in range(3)] == ["first, red", "alpha", "first, red"]
    assert dataset.num_skipped == 1
    with pytest.raises(ValueError, match="no column 'url'"):
        CsvDataset(folder / "list.csv", 8, image_column="url")


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    for s in range(4):
        samples = []
        for k in range(3):
            key = f"{s:05d}{k:04d}"
            samples += [
                (f"{key}.jpg", encode(COLOURS[k], "JPEG")),
                (f"{key}.txt", f"shard {s} item {k}".encode()),
            ]
        if s == 1:
            samples += [
                ("bad.jpg", b"garbage"),
                ("bad.txt", b"bad"),
                ("rgba.png", rgba_png()),
                ("rgba.txt", b"rgba"),
            ]
        write_shard(tmp_path / f"shard-{s:03d}.tar", samples)
    return tmp_path


def test_expand_urls(shards):
    assert expand_urls("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_urls("{x,y}-{1..2}.tar") == ["x-1.tar", "x-2.tar", "y-1.tar", "y-2.tar"]
    assert expand_urls(str(shards / "shard-*.tar")) == [str(shards / f"shard-{i:03d}.tar") for i in range(4)]


def test_webdataset_items_and_skipping(shards):
    dataset = WebDataset(str(shards / "shard-{000..003}.tar"), 8, low_res_size=4, val_size=1, shuffle_buffer=0)
    items = list(dataset)
    assert len(items) == 3 + 4 + 3 + 2  # shard 1 has a bad sample; the last shard's first sample is val
    assert dataset.num_skipped == 1
    assert items[0]["caption"] == "shard 0 item 0" and items[0]["image"].shape == (3, 8, 8)
    assert items[0]["low_res"].shape == (3, 4, 4)
    val = list(WebDataset(str(shards / "shard-*.tar"), 8, split="val", val_size=1))
    assert [item["caption"] for item in val] == ["shard 3 item 0"]
    shuffled = WebDataset(str(shards / "shard-*.tar"), 8, val_size=1, shuffle_buffer=4, seed=1)
    assert sorted(i["caption"] for i in shuffled) == sorted(i["caption"] for i in items)


def test_shard_splitting_across_workers_and_ranks(shards, monkeypatch):
    urls = [f"s{i}" for i in range(8)]
    readers = [split_shards(urls, rank, 2, worker, 2) for rank in range(2) for worker in range(2)]
    assert sorted(u for r in readers for u in r) == urls and all(len(r) == 2 for r in readers)
    monkeypatch.setenv("WORLD_SIZE", "2")
    captions = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        captions.append(
            {i["caption"] for i in WebDataset(str(shards / "shard-*.tar"), 8, val_size=0, shuffle_buffer=0)}
        )
    assert not captions[0] & captions[1] and len(captions[0] | captions[1]) == 13


def test_webdataset_in_dataloader_workers(shards):
    dataset = WebDataset(str(shards / "shard-*.tar"), 8, val_size=0, shuffle_buffer=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    captions = [item["caption"] for item in loader]
    assert sorted(captions) == sorted(item["caption"] for item in dataset) and len(captions) == 13


def test_webdataset_errors(tmp_path):
    with pytest.raises(ValueError, match="no tar shards"):
        WebDataset(str(tmp_path / "*.tar"), 8)
    write_shard(tmp_path / "bad.tar", [("a.jpg", b"x"), ("a.txt", b"a")])
    with pytest.raises(ValueError, match="no readable"):
        list(WebDataset(str(tmp_path / "bad.tar"), 8, val_size=0))


def test_build_dataset_paths(folder, shards):
    config = DataConfig(dataset="folder", path=str(folder), image_size=8, val_size=2)
    assert len(build_dataset(config, split="val")) == 2
    config = DataConfig(
        dataset="webdataset", path=str(shards / "shard-*.tar"), image_size=8, options={"shuffle_buffer": 0}
    )
    assert next(iter(build_dataset(config, low_res_size=4)))["low_res"].shape == (3, 4, 4)
    with pytest.raises(ValueError, match="needs data.path"):
        build_dataset(DataConfig(dataset="csv"))


def test_webdataset_repeat(shards, monkeypatch):
    dataset = WebDataset(str(shards / "shard-*.tar"), 8, val_size=0, shuffle_buffer=0, repeat=True)
    assert len(list(itertools.islice(dataset, 30))) == 30  # more than one pass of 13
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")  # 4 shards: ranks 4-7 get none
    with pytest.raises(ValueError, match="none to repeat"):
        next(iter(WebDataset(str(shards / "shard-*.tar"), 8, repeat=True)))
