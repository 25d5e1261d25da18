"""File formats users load: kohya LoRA (plain and with bundled embedding) and A1111 embeddings."""
