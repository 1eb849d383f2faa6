"""Train the diffusion prior (CLIP text embedding -> CLIP image embedding).

accelerate launch train/prior.py configs/prior/shapes.yaml train.batch_size=256
python train/prior.py configs/prior/tiny.yaml train.max_steps=20
"""

from unclip.training import train_main


def main(argv=None):
    return train_main(("prior",), argv, __doc__)


if __name__ == "__main__":
    main()
