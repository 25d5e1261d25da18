"""The release folder: LoRA files for every UI, embeddings, previews, metrics and a model card."""
