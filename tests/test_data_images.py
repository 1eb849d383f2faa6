import io
import itertools
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from unclip.config import DataConfig
from unclip.data import build_dataset
from unclip.data.images import (
    MAX_WARNINGS,
    CsvDataset,
    ImageFolderDataset,
    WebDataset,
    expand_urls,
    load_image,
    split_shards,
    to_rgb,
)
from unclip.imageio import load_image as imageio_load_image
from unclip.imageio import open_image

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


def png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


def grey16_png() -> bytes:
    """A 16-bit greyscale PNG, 8x8: columns 0, 9362, ..., 65535 (0, 36, ..., 255 in 8 bits)."""
    row = (np.arange(8) * 65535 / 7).round().astype(np.uint16)
    return png_bytes(Image.fromarray(np.tile(row, (8, 1))))


GREY16_EXPECTED = (np.arange(8) * 255 / 7).round()


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    with Image.open(io.BytesIO(grey16_png())) as image:
        assert image.mode.startswith("I")  # PIL keeps the 16 bits ("I;16", or "I" in older versions)
        rgb = np.asarray(to_rgb(image), dtype=np.float64)
    np.testing.assert_allclose(rgb[0, :, 0], GREY16_EXPECTED, atol=1)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    # at inference: the file read for a pipeline
    path = tmp_path / "grey16.png"
    path.write_bytes(grey16_png())
    np.testing.assert_allclose(np.asarray(open_image(path))[0, :, 0], GREY16_EXPECTED, atol=1)
    assert -0.9 < imageio_load_image(path, 8).mean() < 0.1  # mid-grey on average, not all white (1.0)
    # as training data
    (tmp_path / "grey16.txt").write_text("a grey ramp")
    item = ImageFolderDataset(tmp_path, 8, val_size=0)[0]
    assert item["caption"] == "a grey ramp" and abs(item["image"].mean()) < 0.1
    assert item["image"][0, :, 0].tolist() == sorted(item["image"][0, :, 0].tolist())


def test_16bit_greyscale_with_a_transparent_value():
    array = np.full((2, 2), 40000, dtype=np.uint16)
    array[0, 0] = 1000
    with Image.open(io.BytesIO(png_bytes(Image.fromarray(array), transparency=1000))) as image:
        rgb = to_rgb(image)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (156, 156, 156)


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([200, 0, 0, 0, 0, 200] + [0] * 762)
    image.putpixel((0, 0), 1)
    return Image.open(io.BytesIO(png_bytes(image, transparency=1)))  # index 1 (blue, at 0, 0) is transparent


def rgb_with_transparent_colour() -> Image.Image:
    image = Image.new("RGB", (2, 1), (10, 20, 30))
    image.putpixel((0, 0), (1, 2, 3))
    return Image.open(io.BytesIO(png_bytes(image, transparency=(1, 2, 3))))  # (1, 2, 3), at 0, 0, is transparent


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("LA", (2, 1), (100, 255)), (100, 100, 100)),
        (lambda: Image.new("LA", (2, 1), (0, 0)), (255, 255, 255)),
        (lambda: Image.new("RGBA", (2, 1), (0, 0, 0, 128)), (127, 127, 127)),
        (lambda: Image.new("La", (2, 1), (50, 128)), (177, 177, 177)),  # premultiplied: 50 + (255 - 128)
        (palette_with_transparency, (200, 0, 0)),
        (rgb_with_transparent_colour, (10, 20, 30)),
        (lambda: Image.new("CMYK", (2, 1), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("CMYK", (2, 1), (0, 0, 0, 255)), (0, 0, 0)),
        (lambda: Image.new("CMYK", (2, 1), (128, 0, 0, 128)), (63, 127, 127)),  # (255 - C)(255 - K) / 255
        (lambda: Image.new("1", (2, 1), 1), (255, 255, 255)),
        (lambda: Image.new("L", (2, 1), 77), (77, 77, 77)),
        (lambda: Image.new("I;16", (2, 1), 65535), (255, 255, 255)),
        (lambda: Image.new("I;16", (2, 1), 32896), (128, 128, 128)),
        (lambda: Image.new("I;16B", (2, 1), 257 * 20), (20, 20, 20)),
        (lambda: Image.new("I", (2, 1), 257 * 200), (200, 200, 200)),
        (lambda: Image.fromarray(np.array([[0.0, 0.5]], dtype=np.float32)), (128, 128, 128)),  # F in 0..1
        (lambda: Image.fromarray(np.array([[0.0, 100.0]], dtype=np.float32)), (100, 100, 100)),  # F in 0..255
        (lambda: Image.fromarray(np.array([[-1.0, 3.0]], dtype=np.float32)), (255, 255, 255)),  # F: min..max
        (lambda: Image.fromarray(np.array([[-70000, 70000]], dtype=np.int32)), (255, 255, 255)),  # I: min..max
        (lambda: Image.new("LAB", (2, 1), (255, 128, 128)), (254, 255, 254)),  # CIE white -> sRGB white
    ],
)
def test_modes_convert_to_rgb(make, expected):
    image = make()
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((1, 0)) == expected
    if "transparency" in image.info:
        assert rgb.getpixel((0, 0)) == (255, 255, 255)


def test_float_image_with_nan_is_black_there():
    rgb = to_rgb(Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32)))
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 0)) == (128, 128, 128)


def test_corrupt_images_first_few_logged_and_total_shown(tmp_path, caplog):
    for i in range(12):
        (tmp_path / f"bad{i:02d}.png").write_bytes(b"not a png " + bytes([i]))
        (tmp_path / f"bad{i:02d}.txt").write_text("bad")
    for i, colour in enumerate(COLOURS[:3]):
        (tmp_path / f"good{i}.png").write_bytes(encode(colour))
        (tmp_path / f"good{i}.txt").write_text("good")
    dataset = ImageFolderDataset(tmp_path, 8, val_size=0)
    with caplog.at_level("WARNING", logger="unclip.data.images"):
        items = [dataset[i] for i in range(len(dataset))]
    assert {item["caption"] for item in items} == {"good"} and dataset.num_skipped == 12
    messages = [r.getMessage() for r in caplog.records]
    each = [m for m in messages if m.startswith("skipping unreadable image")]
    assert len(each) == MAX_WARNINGS and "bad00.png" in each[0] and "total" in each[-1]
    assert f"{tmp_path}: 12 of 15 images could not be read and are skipped" in messages
    assert len(messages) == MAX_WARNINGS + 2  # and "10 unreadable images skipped so far"
    caplog.clear()
    with caplog.at_level("WARNING", logger="unclip.data.images"):
        [dataset[i] for i in range(len(dataset))]  # a second pass: the bad files are known, nothing new
    assert not caplog.records


def test_webdataset_logs_the_skipped_total_per_pass(tmp_path, caplog):
    samples = [(f"{k:03d}.png", b"garbage") for k in range(7)] + [(f"{k:03d}.txt", b"x") for k in range(7)]
    samples = sorted(samples) + [("good.png", encode(COLOURS[0])), ("good.txt", b"good")]
    write_shard(tmp_path / "s.tar", samples)
    with caplog.at_level("WARNING", logger="unclip.data.images"):
        items = list(WebDataset(str(tmp_path / "s.tar"), 8, val_size=0, shuffle_buffer=0))
    assert [item["caption"] for item in items] == ["good"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("skipping unreadable image") for m in messages) == MAX_WARNINGS
    assert any(m.startswith("7 unreadable samples or shards skipped in a pass") for m in messages)


def test_data_files_follow_the_umask(tmp_path):
    """Files the data code writes (embedding shards, the OpenMoji render cache) get the umask's mode, as any
    other tool's output, not the 0600 of a temporary file."""
    from unclip.data.embeddings import write_shard
    from unclip.data.openmoji import OpenMojiDataset

    old = os.umask(0o022)
    try:
        embed = np.ones((2, 4), dtype=np.float16)
        write_shard(tmp_path / "emb", 0, image_embed=embed, text_embed=embed, captions=["a", "b"])
        OpenMojiDataset(16, cache_dir=tmp_path / "cache", val_size=8).image(0)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".npy" for p in files) and any(p.suffix == ".png" for p in files)
    assert {p.stat().st_mode & 0o777 for p in files} == {0o644}


@pytest.mark.parametrize(
    "image, fmt, expected",
    [
        (Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),  # decoded at a reduced scale
        (Image.new("L", (64, 48), 100), "JPEG", (100, 100, 100)),
        (Image.new("I;16", (64, 48), 30000), "TIFF", (117, 117, 117)),  # 30000 / 257
        (Image.new("LA", (64, 48), (100, 255)), "PNG", (100, 100, 100)),
    ],
)
def test_training_data_of_other_modes(image, fmt, expected):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    assert load_image(io.BytesIO(buffer.getvalue()), 8).getpixel((4, 4)) == expected
