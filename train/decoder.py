"""Train the 64 px decoder (CLIP image embedding + caption -> image), or its inpainting variant.

accelerate launch train/decoder.py configs/decoder/shapes.yaml
python train/decoder.py configs/decoder/tiny.yaml train.max_steps=20
python train/decoder.py configs/decoder/inpaint_tiny.yaml train.init_from=runs/decoder-tiny/export
"""

from unclip.training import train_main


def main(argv=None):
    return train_main(("decoder", "inpaint"), argv, __doc__)


if __name__ == "__main__":
    main()
