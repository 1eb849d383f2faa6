"""Train a diffusion upsampler (64 -> 256 or 256 -> 1024; the config's model section picks the stage).

accelerate launch train/upsampler.py configs/upsampler/shapes_256.yaml
python train/upsampler.py configs/upsampler/tiny.yaml train.max_steps=20
"""

from unclip.training import train_main


def main(argv=None):
    return train_main(("upsampler",), argv, __doc__)


if __name__ == "__main__":
    main()
