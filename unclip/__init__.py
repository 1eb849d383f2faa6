"""unclip: train and sample the unCLIP (DALL·E 2) cascade."""

__version__ = "0.1.0"
