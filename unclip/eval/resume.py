"""Resume logs of evaluation runs, kept until their results are written: a `shapes` run's scored batches
(`ResumeLog`), and the finished rows of an `inpaint` or `variations` run (`RowLog`), one JSON line each."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from unclip.checkpoint import atomic_write_bytes
from unclip.eval.shapes_checker import CheckResult


def _check_header(path: Path, lines: list[str], settings: dict) -> None:
    """Refuse a log whose first line holds other settings than `settings`, naming the ones that differ."""
    try:
        header = json.loads(lines[0])["settings"] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        header = None
    if header != settings:
        header = header if isinstance(header, dict) else {}
        differ = ", ".join(sorted(k for k in {*header, *settings} if header.get(k) != settings.get(k)))
        raise ValueError(
            f"{path} holds the results of a run with other settings ({differ or 'unreadable'}); delete it to start "
            "over, or pass another --out"
        )


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write(path: Path, settings: dict, lines: list[str]) -> None:
    header = json.dumps({"settings": settings})
    atomic_write_bytes(path, "".join(line + "\n" for line in [header, *lines]).encode())


class RowLog:
    """The finished rows of a run, by key, one JSON line each after a header line with the run's settings: a run
    killed half-way and started again with the same settings and file makes only the missing rows; a log written
    under other settings is refused rather than mixed in. Rows are JSON objects and read back as written."""

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # as it reads back
        self.rows: dict[str, dict] = {}
        if not self.path.exists():
            _write(self.path, self.settings, [])
            return
        lines = self.path.read_text().splitlines()
        _check_header(self.path, lines, self.settings)
        for line in lines[1:]:
            try:
                record = json.loads(line)
                self.rows[record["key"]] = record["row"]
            except (json.JSONDecodeError, KeyError, TypeError):  # the last line of a run killed while writing it
                continue

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def add(self, key: str, row: dict) -> None:
        _append(self.path, {"key": key, "row": row})
        self.rows[key] = json.loads(json.dumps(row))


class ResumeLog:
    """The scored batches of a `shapes` run, one JSON line each, so that a run killed half-way resumes where it
    stopped: `python -m unclip.eval shapes ... --out F` keeps them in `F.partial.jsonl` until F is written. The
    first line holds the run's settings; a log written under other settings is refused rather than mixed in.
    Verdicts and embeddings round-trip exactly (floats as JSON reprs), so a resumed run's results equal an
    uninterrupted one's."""

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # as it reads back
        self.records: dict[str, dict[int, dict]] = {}
        if not self.path.exists():
            self._rewrite([])
            return
        lines = self.path.read_text().splitlines()
        _check_header(self.path, lines, self.settings)
        kept = []
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed while writing it
                continue
            self.records.setdefault(record["set"], {})[record["start"]] = self._load(record)
            kept.append(line)
        if len(kept) != len(lines) - 1:
            self._rewrite(kept)

    def batches(self, name: str) -> dict[int, dict]:
        return self.records.get(name, {})

    def __len__(self) -> int:
        return sum(len(v) for v in self.records.values())

    def add(self, name: str, start: int, scored: dict) -> None:
        record = {
            "set": name,
            "start": start,
            "checks": [c.to_dict() for c in scored["checks"]],
            "candidates": [[[score, c.to_dict()] for score, c in row] for row in scored["candidates"]],
            "image_embeds": None if scored["image_embeds"] is None else scored["image_embeds"].tolist(),
        }
        _append(self.path, record)
        self.records.setdefault(name, {})[start] = scored

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _rewrite(self, lines: list[str]) -> None:
        _write(self.path, self.settings, lines)

    @staticmethod
    def _load(record: dict) -> dict:
        embeds = record["image_embeds"]
        return {
            "checks": [CheckResult.from_dict(c) for c in record["checks"]],
            "candidates": [[(score, CheckResult.from_dict(c)) for score, c in row] for row in record["candidates"]],
            "image_embeds": None if embeds is None else torch.tensor(embeds, dtype=torch.float32),
        }
