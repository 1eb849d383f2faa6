"""Train a CLIP from scratch on image-caption pairs (contrastive loss, Radford et al. 2021).

accelerate launch train/clip.py configs/clip/shapes.yaml
python train/clip.py configs/clip/tiny.yaml train.max_steps=20 train.output_dir=runs/clip-try
python train/clip.py configs/clip/shapes.yaml --resume latest

The architecture is the config's clip.model_config (an open_clip model config). The export folder
(<train.output_dir>/export) is a CLIP checkpoint: point the other stages at it with clip.checkpoint=<folder>,
or load it with open_clip.create_model("local-dir:<folder>").
"""

from unclip.training import train_main


def main(argv=None):
    return train_main(("clip",), argv, __doc__)


if __name__ == "__main__":
    main()
