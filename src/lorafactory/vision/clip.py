"""CLIP image and text embeddings (transformers), for prompt alignment and image diversity."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image


def _projected(output: Any) -> torch.Tensor:
    """``get_*_features`` returns the tensor (transformers 4) or an output whose pooler is it (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Clip:
    """A CLIP model and its processor from a folder or hub id; embeddings are L2-normalised."""

    def __init__(self, model_id: str, device: torch.device, batch_size: int = 16) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(model_id).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(model_id)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> np.ndarray:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start : start + self.batch_size], return_tensors="pt")[
                "pixel_values"
            ]
            chunks.append(_projected(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        features = _projected(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        )
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
