import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import Dataset

from unclip.clip import TINY_CLIP_CONFIG, ClipAdapter
from unclip.data.embeddings import EmbeddingDataset, write_shard

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square", "two blue circles", "", "a green triangle above a yellow star " * 3]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"train_{name}", ROOT / "train" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TinyImages(Dataset):
    """A stand-in for unclip.data's datasets: seeded random images with captions."""

    def __init__(self, n=10, size=32):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.captions = [f"{CAPTIONS[i % len(CAPTIONS)]} {i}" for i in range(n)]

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": self.captions[i], "scene": {"ignored": True}}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({"kind": "clip", "clip": {"model_config": TINY_CLIP_CONFIG}}))
    script = load_script("embed")
    dataset = TinyImages()
    script.build_dataset = lambda data_config, split: dataset
    out = tmp / "emb"
    argv = [
        str(config),
        "--out",
        str(out),
        "--tokens",
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ]
    script.main(argv)
    return out, dataset, script, argv


def test_embed_writes_clip_retrieval_layout(embedded):
    out, _, _, _ = embedded
    for kind in ("img_emb", "text_emb", "text_tokens", "text_mask"):
        assert sorted(p.name for p in (out / kind).iterdir()) == [f"{kind}_{i:04d}.npy" for i in range(3)]
    assert [len(np.load(out / "img_emb" / f"img_emb_{i:04d}.npy")) for i in range(3)] == [4, 4, 2]
    assert np.load(out / "img_emb" / "img_emb_0000.npy").dtype == np.float16
    lines = (out / "metadata" / "metadata_0002.jsonl").read_text().splitlines()
    assert [json.loads(line)["caption"] for line in lines] == TinyImages().captions[8:]
    info = json.loads((out / "embeddings.json").read_text())
    assert info["count"] == 10 and info["normalized"] and info["embed_dim"] == 32 and info["text_width"] == 48
    assert not list(out.rglob("*.tmp"))


def test_embeddings_equal_adapter_outputs(embedded):
    out, dataset, _, _ = embedded
    clip = ClipAdapter.from_model_config(TINY_CLIP_CONFIG)
    with pytest.warns(UserWarning, match="truncated"):
        text = clip.embed_text(dataset.captions, normalize=True)
    image = clip.embed_image(dataset.images, normalize=True)
    train, val = EmbeddingDataset(out, val_size=3), EmbeddingDataset(out, split="val", val_size=3)
    assert (len(train), len(val)) == (7, 3)
    items = [train[i] for i in range(7)] + [val[i] for i in range(3)]
    stacked = {k: torch.stack([item[k] for item in items]) for k in ("image_embed", "text_embed", "text_tokens")}
    fp16 = {"rtol": 1e-3, "atol": 1e-3}
    torch.testing.assert_close(stacked["image_embed"], image, **fp16)
    torch.testing.assert_close(stacked["text_embed"], text.embed, **fp16)
    torch.testing.assert_close(stacked["text_tokens"], text.tokens, **fp16)
    assert torch.equal(torch.stack([item["text_mask"] for item in items]), text.mask)
    assert [item["caption"] for item in items] == dataset.captions
    assert items[0]["image_embed"].dtype == torch.float32 and items[0]["text_mask"].dtype == torch.bool
    assert "text_tokens" not in EmbeddingDataset(out, val_size=3, text_tokens=False)[0]


def test_embed_refuses_a_folder_with_embeddings(embedded, capsys):
    _, _, script, argv = embedded
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 1
    assert "already holds embeddings" in capsys.readouterr().err


def test_embed_help_explains(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("embed").main(["--help"])
    assert exit_info.value.code == 0
    assert "clip-retrieval" in capsys.readouterr().out


def make_shard(path, rows=5, index=0, **overrides):
    arrays = {
        "image_embed": np.zeros((rows, 8)),
        "text_embed": np.zeros((rows, 8)),
        "captions": [f"c{i}" for i in range(rows)],
    }
    write_shard(path, index, **{**arrays, **overrides})


def test_embedding_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="no img_emb/"):
        EmbeddingDataset(tmp_path)
    make_shard(tmp_path / "ok")
    with pytest.raises(ValueError, match="val_size"):
        EmbeddingDataset(tmp_path / "ok", val_size=5)
    with pytest.raises(ValueError, match="split"):
        EmbeddingDataset(tmp_path / "ok", split="test", val_size=1)
    make_shard(tmp_path / "short_text")
    np.save(tmp_path / "short_text" / "text_emb" / "text_emb_0000.npy", np.zeros((4, 8), np.float16))
    with pytest.raises(ValueError, match="disagree"):
        EmbeddingDataset(tmp_path / "short_text", val_size=1)
    make_shard(
        tmp_path / "short_meta",
        captions=["only one"],
        image_embed=np.zeros((1, 8)),
        text_embed=np.zeros((1, 8)),
    )
    np.save(tmp_path / "short_meta" / "img_emb" / "img_emb_0000.npy", np.zeros((2, 8), np.float16))
    np.save(tmp_path / "short_meta" / "text_emb" / "text_emb_0000.npy", np.zeros((2, 8), np.float16))
    with pytest.raises(ValueError, match="captions"):
        EmbeddingDataset(tmp_path / "short_meta", val_size=1)
    make_shard(tmp_path / "no_text")
    (tmp_path / "no_text" / "text_emb" / "text_emb_0000.npy").unlink()
    with pytest.raises(ValueError, match="no text_emb/text_emb_0000.npy"):
        EmbeddingDataset(tmp_path / "no_text", val_size=1)


def test_embedding_dataset_reads_clip_retrieval_numbering(tmp_path):
    # clip-retrieval pads shard numbers to the digits of its shard count: img_emb_0.npy ... img_emb_10.npy
    for index in (10, 2):
        make_shard(tmp_path, rows=2, index=index, captions=[f"shard {index}"] * 2)
    for kind in ("img_emb", "text_emb", "metadata"):
        for old in sorted((tmp_path / kind).iterdir()):
            old.rename(old.with_name(old.name.replace("_0002", "_2").replace("_0010", "_10")))
    dataset = EmbeddingDataset(tmp_path, val_size=0)
    assert [dataset[i]["caption"] for i in range(4)] == ["shard 2"] * 2 + ["shard 10"] * 2
    assert dataset.embed_dim == 8 and not dataset.has_text_tokens


def test_embedding_dataset_pickles_without_its_arrays(tmp_path):
    import pickle

    make_shard(tmp_path, rows=3)
    dataset = EmbeddingDataset(tmp_path, val_size=1)
    dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._arrays is None and clone[1]["caption"] == "c1"


def test_embedding_dataset_reads_parquet_metadata(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    make_shard(tmp_path, rows=2)
    (tmp_path / "metadata" / "metadata_0000.jsonl").unlink()
    pq.write_table(
        pa.table({"caption": ["p0", "p1"], "url": ["u0", "u1"]}),
        tmp_path / "metadata" / "metadata_0000.parquet",
    )
    assert EmbeddingDataset(tmp_path, val_size=1)[0]["caption"] == "p0"
