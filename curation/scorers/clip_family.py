"""open_clip-based scorers: HPSv2 / HPSv2.1, CLIPScore and the LAION aesthetic predictor v2.

- HPSv2 (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341): open_clip ViT-H-14 fine-tuned;
  score = cosine(image, prompt) (upstream `hpsv2/img_score.py` takes diag(I·Tᵀ) of normalised features).
- CLIPScore (Hessel et al. 2021, arXiv 2104.08718, eq. 1 with w = 100 as in torchmetrics):
  max(100·cosine(image, prompt), 0).
- Aesthetic v2 (christophschuhmann/improved-aesthetic-predictor): a linear-only MLP on the L2-normalised
  CLIP ViT-L/14 image embedding (docs/data-and-scorers.md §4.2); prompt-independent, about 1-10.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from prefcurate.curation.scorers.base import (
    CheckpointFormatError, MissingWeightsError, NeuralScorer, ScoreMLP, file_digest, load_into,
    load_state_dict_file, require_file,
)


CLIP_FAMILY_CODE_VERSION = "1"
HPS_FILES = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
HPS_SOURCE = "Hugging Face Hub xswu/HPSv2"
# OpenAI CLIP ViT-L/14 in open_clip's layout (open_clip_config.json + open_clip_model.safetensors); open_clip's
# own pretrained table points 'ViT-L-14'/'openai' at this Hub repo. Backbone of `clip` and `aesthetic`.
OPENAI_L14_DIR = "vit_large_patch14_clip_224.openai"
OPENAI_L14_SOURCE = "Hugging Face Hub timm/vit_large_patch14_clip_224.openai"
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_SOURCE = "GitHub christophschuhmann/improved-aesthetic-predictor (file " + AESTHETIC_FILE + ")"


def load_open_clip_dir(scorer: str, model_dir: Path, source: str):
    """(model, preprocess, tokenizer, files) from a directory in open_clip's Hub layout:
    open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}) + open_clip_model.safetensors
    (or open_clip_pytorch_model.bin)."""
    config = require_file(scorer, Path(model_dir) / "open_clip_config.json", source)
    weights = next((Path(model_dir) / f for f in OPEN_CLIP_WEIGHT_FILES if (Path(model_dir) / f).is_file()), None)
    if weights is None:
        raise MissingWeightsError(scorer, Path(model_dir) / OPEN_CLIP_WEIGHT_FILES[0], source)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}", load_weights=False)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointFormatError(f"{config} is not a usable open_clip config: {err}") from err
    load_into(model, load_state_dict_file(weights), weights)
    return model, preprocess, open_clip.get_tokenizer(f"local-dir:{model_dir}"), [config, weights]


def load_open_clip_file(arch: str, checkpoint: Path):
    """(model, preprocess, tokenizer, files): architecture `arch` (a built-in or added open_clip config),
    random init (pretrained=None: nothing is downloaded), then the state dict from `checkpoint`."""
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    load_into(model, load_state_dict_file(checkpoint), checkpoint)
    return model, preprocess, open_clip.get_tokenizer(arch), [checkpoint]


class OpenClipScorer(NeuralScorer):
    """Prompt-image cosine on an open_clip model; `clip_score=True` gives CLIPScore's max(100·cos, 0)."""

    def __init__(self, name: str, version: str, model: nn.Module, preprocess, tokenizer, *, clip_score: bool,
                 device: str = "cpu", batch_size: int = 32):
        super().__init__(device, batch_size)
        self.name, self.version, self.uses_prompt, self.higher_is_better = name, version, True, True
        self.model = model.eval().requires_grad_(False).to(self._device)
        self.image_transform = preprocess  # torchvision Compose of picklable steps
        self.tokenizer = tokenizer
        self.clip_score = clip_score

    def _encode_texts(self, prompts: list[str]) -> list[torch.Tensor]:
        tokens = self.tokenizer(prompts).to(self._device)  # (P, context_length)
        return list(F.normalize(self.model.encode_text(tokens).float(), dim=-1))  # P × (D,)

    def _score_batch(self, pixels: torch.Tensor, text_entries: list[torch.Tensor]) -> torch.Tensor:
        image = F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # (B, D)
        cosine = (image * torch.stack(text_entries)).sum(-1)  # (B,)
        return (100.0 * cosine).clamp(min=0.0) if self.clip_score else cosine


def hps_scorer(variant: str, weights_dir: Path | None, device: str = "cpu", *, arch: str = "ViT-H-14",
               batch_size: int = 32) -> OpenClipScorer:
    """HPSv2 ('hpsv2') or HPSv2.1 ('hpsv2.1') from weights_dir/HPS_v2{,.1}_compressed.pt."""
    path = require_file(variant, _need_dir(variant, weights_dir) / HPS_FILES[variant], HPS_SOURCE)
    model, preprocess, tokenizer, files = load_open_clip_file(arch, path)
    version = f"{variant}-code{CLIP_FAMILY_CODE_VERSION}-{arch}+{file_digest(*files)}"
    return OpenClipScorer(variant, version, model, preprocess, tokenizer, clip_score=False, device=device,
                          batch_size=batch_size)


def _backbone(scorer: str, weights_dir: Path | None, arch: str | None, checkpoint: Path | None):
    """OpenAI ViT-L/14 from weights_dir/OPENAI_L14_DIR, or any open_clip `arch` + `checkpoint` file."""
    if checkpoint is not None:
        if arch is None:
            raise ValueError(f"scorer {scorer!r}: a checkpoint file needs its open_clip architecture name (arch=...)")
        return load_open_clip_file(arch, require_file(scorer, Path(checkpoint), f"open_clip architecture {arch}"))
    return load_open_clip_dir(scorer, _need_dir(scorer, weights_dir) / OPENAI_L14_DIR, OPENAI_L14_SOURCE)


def clip_scorer(weights_dir: Path | None, device: str = "cpu", *, arch: str | None = None,
                checkpoint: Path | None = None, batch_size: int = 32) -> OpenClipScorer:
    """CLIPScore on OpenAI ViT-L/14 (weights_dir/vit_large_patch14_clip_224.openai/), or on any open_clip
    architecture given as arch=... with checkpoint=<.safetensors or .pt state dict>."""
    model, preprocess, tokenizer, files = _backbone("clip", weights_dir, arch, checkpoint)
    version = f"clip-code{CLIP_FAMILY_CODE_VERSION}+{file_digest(*files)}"
    return OpenClipScorer("clip", version, model, preprocess, tokenizer, clip_score=True, device=device,
                          batch_size=batch_size)


class AestheticScorer(NeuralScorer):
    """head(normalise(CLIP image embedding)); prompt-independent."""

    def __init__(self, version: str, backbone: nn.Module, preprocess, head: ScoreMLP, device: str = "cpu",
                 batch_size: int = 32):
        super().__init__(device, batch_size)
        self.name, self.version, self.uses_prompt, self.higher_is_better = "aesthetic", version, False, True
        self.backbone = backbone.eval().requires_grad_(False).to(self._device)
        self.head = head.eval().requires_grad_(False).to(self._device)
        self.image_transform = preprocess

    def _encode_texts(self, prompts: list[str]) -> list[object]:
        raise RuntimeError("the aesthetic scorer ignores prompts")  # never called: uses_prompt is False

    def _score_batch(self, pixels: torch.Tensor, text_entries: list[object]) -> torch.Tensor:
        embedding = F.normalize(self.backbone.encode_image(pixels).float(), dim=-1)  # (B, D)
        with torch.autocast(device_type=pixels.device.type, enabled=False):  # the head in fp32
            return self.head(embedding).squeeze(-1)


def aesthetic_scorer(weights_dir: Path | None, device: str = "cpu", *, arch: str | None = None,
                     checkpoint: Path | None = None, batch_size: int = 32) -> AestheticScorer:
    """Head from weights_dir/sac+logos+ava1-l14-linearMSE.pth; backbone as for `clip_scorer`."""
    head_path = require_file("aesthetic", _need_dir("aesthetic", weights_dir) / AESTHETIC_FILE, AESTHETIC_SOURCE)
    head_state = load_state_dict_file(head_path)
    backbone, preprocess, _, files = _backbone("aesthetic", weights_dir, arch, checkpoint)
    embed_dim = backbone.visual.output_dim  # 768 for ViT-L/14
    head = ScoreMLP(embed_dim)
    if head_state.get("layers.0.weight", torch.empty(0, 0)).shape[-1] != embed_dim:
        raise CheckpointFormatError(f"{head_path}: layers.0.weight does not take the backbone's {embed_dim}-d "
                                    f"embeddings (or is missing)")
    load_into(head, head_state, head_path)
    version = f"aesthetic-code{CLIP_FAMILY_CODE_VERSION}+{file_digest(head_path, *files)}"
    return AestheticScorer(version, backbone, preprocess, head, device=device, batch_size=batch_size)


def _need_dir(scorer: str, weights_dir: Path | None) -> Path:
    if weights_dir is None:
        raise ValueError(f"scorer {scorer!r} needs weights: pass weights_dir=<directory holding its checkpoint files>")
    return Path(weights_dir)
