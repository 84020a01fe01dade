"""PickScore v1 (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569, §4): a CLIP-H model fine-tuned on
Pick-a-Pic; score = exp(logit_scale) · cosine(image, prompt), the logit its softmax over candidates uses.

Loads with transformers' CLIPModel from two local directories under weights_dir:
  PickScore_v1/                       config.json + model.safetensors (or pytorch_model.bin)
                                      (Hub yuvalkirstain/PickScore_v1)
  CLIP-ViT-H-14-laion2B-s32B-b79K/    preprocessor_config.json, vocab.json, merges.txt (+ tokenizer_config.json)
                                      (Hub laion/CLIP-ViT-H-14-laion2B-s32B-b79K; upstream's processor)
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from prefcurate.curation.scorers.base import (
    CheckpointFormatError, MissingWeightsError, NeuralScorer, file_digest, require_file,
)


PICKSCORE_CODE_VERSION = "1"
MODEL_DIR, MODEL_SOURCE = "PickScore_v1", "Hugging Face Hub yuvalkirstain/PickScore_v1"
PROCESSOR_DIR = "CLIP-ViT-H-14-laion2B-s32B-b79K"
PROCESSOR_SOURCE = "Hugging Face Hub laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MODEL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILES = ("preprocessor_config.json", "vocab.json", "merges.txt")
MAX_PROMPT_TOKENS = 77  # CLIP's context length; longer prompts are truncated, as upstream does


class HFImageTransform:
    """Picklable PIL -> (3, H, W) float32 wrapper around a transformers image processor."""

    def __init__(self, processor: CLIPImageProcessor):
        self.processor = processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0].float()


class PickScoreScorer(NeuralScorer):
    def __init__(self, version: str, model: CLIPModel, tokenizer: CLIPTokenizer, processor: CLIPImageProcessor,
                 device: str = "cpu", batch_size: int = 32):
        super().__init__(device, batch_size)
        self.name, self.version, self.uses_prompt, self.higher_is_better = "pickscore", version, True, True
        self.model = model.eval().requires_grad_(False).to(self._device)
        self.tokenizer = tokenizer
        self.image_transform = HFImageTransform(processor)

    def _encode_texts(self, prompts: list[str]) -> list[torch.Tensor]:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt").to(self._device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                       attention_mask=tokens["attention_mask"]).pooler_output  # (P, text width)
        return list(F.normalize(self.model.text_projection(pooled).float(), dim=-1))  # P × (D,)

    def _score_batch(self, pixels: torch.Tensor, text_entries: list[torch.Tensor]) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # (B, vision width)
        image = F.normalize(self.model.visual_projection(pooled).float(), dim=-1)  # (B, D)
        return self.model.logit_scale.float().exp() * (image * torch.stack(text_entries)).sum(-1)


def pickscore_scorer(weights_dir: Path | None, device: str = "cpu", *, batch_size: int = 32) -> PickScoreScorer:
    if weights_dir is None:
        raise ValueError("scorer 'pickscore' needs weights: pass weights_dir=<directory holding PickScore_v1/ and "
                         f"{PROCESSOR_DIR}/>")
    model_dir, processor_dir = Path(weights_dir) / MODEL_DIR, Path(weights_dir) / PROCESSOR_DIR
    config = require_file("pickscore", model_dir / "config.json", MODEL_SOURCE)
    weights = next((model_dir / f for f in MODEL_WEIGHT_FILES if (model_dir / f).is_file()), None)
    if weights is None:
        raise MissingWeightsError("pickscore", model_dir / MODEL_WEIGHT_FILES[0], MODEL_SOURCE)
    processor_files = [require_file("pickscore", processor_dir / f, PROCESSOR_SOURCE) for f in PROCESSOR_FILES]
    try:
        # use_safetensors=None lets transformers take pytorch_model.bin (loaded with weights_only=True) if needed
        model = CLIPModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise CheckpointFormatError(f"{model_dir} is not a loadable CLIPModel checkpoint: "
                                    f"{type(err).__name__}: {str(err)[:300]}") from err
    tokenizer = CLIPTokenizer.from_pretrained(processor_dir, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(processor_dir, local_files_only=True)
    version = f"pickscore-code{PICKSCORE_CODE_VERSION}+{file_digest(config, weights, processor_files[0])}"
    return PickScoreScorer(version, model, tokenizer, processor, device=device, batch_size=batch_size)
