"""lorafactory: from an anime character's name or images to a trained, evaluated, published LoRA."""

__version__ = "0.1.0"
