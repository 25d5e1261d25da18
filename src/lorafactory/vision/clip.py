"""CLIP image and text embeddings (transformers), for prompt alignment and image diversity."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lorafactory.hubfetch import hub_failure, say_if_downloading


class Clip:
    """A CLIP model and its processor from a folder or hub id; embeddings are L2-normalised."""

    def __init__(self, model_id: str, device: torch.device, batch_size: int = 16) -> None:
        from transformers import CLIPModel, CLIPProcessor

        say_if_downloading(model_id, "config.json", "CLIP model")
        try:
            self.model = CLIPModel.from_pretrained(model_id).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(model_id)
        except OSError as exc:  # transformers' own words name no model when the Hub did not give it
            hub = hub_failure(exc, model_id)
            if hub is None:
                raise
            raise hub from exc
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> np.ndarray:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start : start + self.batch_size], return_tensors="pt")[
                "pixel_values"
            ]
            output = self.model.get_image_features(pixel_values=pixels.to(self.device))
            chunks.append(output.pooler_output)  # transformers 5: the projected embedding, in the pooler's place
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        output = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        features = output.pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
