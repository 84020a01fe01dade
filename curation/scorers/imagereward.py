"""ImageReward v1.0 (Xu et al. 2023, "ImageReward", arXiv 2304.05977, §3): the [CLS] state of BLIP's text
encoder cross-attending to the BLIP ViT's patch tokens -> linear MLP -> r; score = (r − μ)/σ with the
published μ = 0.16717362830052426, σ = 1.0333394966054072.

Built on transformers' BlipVisionModel / BlipTextModel (ports of BLIP's `vit.py` and `med.py`). Files in
weights_dir (Hub THUDM/ImageReward, and Hub google-bert/bert-base-uncased for the tokenizer):
  ImageReward.pt        state dict: blip.visual_encoder.* (BLIP ViT), blip.text_encoder.* (BERT with
                        cross-attention), mlp.layers.{0,2,4,6,7}.*; blip.vision_proj/text_proj are unused
  med_config.json       the BERT config of the text encoder
  bert-base-uncased/    vocab.txt (+ tokenizer_config.json): BLIP's tokenizer. BLIP adds [DEC]/[ENC]
                        special tokens, which change no id of an ordinary prompt, so they are not added here.
The ViT's size is read from the checkpoint's shapes (head width 64, as in BLIP's ViT-B and ViT-L).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from prefcurate.curation.scorers.base import (
    CheckpointFormatError, NeuralScorer, ScoreMLP, file_digest, load_into, load_state_dict_file, require_file,
)


IMAGEREWARD_CODE_VERSION = "1"
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward/ImageReward.py
MAX_PROMPT_TOKENS = 35  # upstream tokenises with padding="max_length", max_length=35
SOURCE = "Hugging Face Hub THUDM/ImageReward"
TOKENIZER_SOURCE = "Hugging Face Hub google-bert/bert-base-uncased"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VIT_HEAD_WIDTH = 64
_VIT_RENAMES = [  # BLIP/timm ViT names -> transformers BlipVisionModel names
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def split_imagereward_state_dict(state: dict[str, torch.Tensor]):
    """ImageReward.pt -> (vision, text, mlp) state dicts in transformers' / our key layout."""
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    vision = {}
    for key, value in part("blip.visual_encoder.").items():
        for pattern, replacement in _VIT_RENAMES:
            if re.match(pattern, key):
                vision[re.sub(pattern, replacement, key)] = value
                break
        else:
            vision[key] = value  # left as is: load_into reports it as unexpected
    text = {k: v for k, v in part("blip.text_encoder.").items() if k != "embeddings.position_ids"}
    return vision, text, part("mlp.")


def vision_config_from(vision: dict[str, torch.Tensor], path: Path) -> BlipVisionConfig:
    """BLIP ViT size from the checkpoint's shapes (create_vit('large', 224) gives 1024 wide, 24 deep, 16 px)."""
    try:
        width = vision["embeddings.class_embedding"].shape[-1]
        patch = vision["embeddings.patch_embedding.weight"].shape[-1]
        n_patches = vision["embeddings.position_embedding"].shape[1] - 1
        depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
        mlp_width = vision["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as err:
        raise CheckpointFormatError(f"{path} has no BLIP visual encoder under blip.visual_encoder.*: {err}") from err
    return BlipVisionConfig(hidden_size=width, intermediate_size=mlp_width, num_hidden_layers=depth,
                            num_attention_heads=width // VIT_HEAD_WIDTH, image_size=round(n_patches ** 0.5) * patch,
                            patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")  # BLIP ViT: LayerNorm eps 1e-6


def text_config_from(med_config: Path, encoder_width: int) -> BlipTextConfig:
    """BlipTextConfig from BLIP's med_config.json; the cross-attention width is the ViT's (set at run time
    upstream: encoder_config.encoder_width = vision_width)."""
    try:
        cfg = json.loads(Path(med_config).read_text())
        return BlipTextConfig(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], encoder_hidden_size=encoder_width,
            intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"], max_position_embeddings=cfg["max_position_embeddings"],
            hidden_act=cfg.get("hidden_act", "gelu"), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_dropout_prob=cfg.get("hidden_dropout_prob", 0.0),
            attention_probs_dropout_prob=cfg.get("attention_probs_dropout_prob", 0.0),
            pad_token_id=cfg.get("pad_token_id", 0))
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(
            f"{med_config} is not a BLIP med_config.json: {type(err).__name__}: {err}") from err


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def imagereward_transform(size: int) -> transforms.Compose:
    """Upstream `_transform(224)`: bicubic resize of the short side, centre crop, CLIP mean/std."""
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
        _to_rgb, transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)])


class ImageRewardScorer(NeuralScorer):
    """Text and image interact by cross-attention, so the per-prompt cache holds token ids, not embeddings."""

    def __init__(self, version: str, vision: BlipVisionModel, text: BlipTextModel, head: ScoreMLP,
                 tokenizer: BertTokenizer, device: str = "cpu", batch_size: int = 32):
        super().__init__(device, batch_size)
        self.name, self.version, self.uses_prompt, self.higher_is_better = "imagereward", version, True, True
        self.vision = vision.eval().requires_grad_(False).to(self._device)
        self.text = text.eval().requires_grad_(False).to(self._device)
        self.head = head.eval().requires_grad_(False).to(self._device)
        self.tokenizer = tokenizer
        self.image_transform = imagereward_transform(vision.config.image_size)

    def _encode_texts(self, prompts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt").to(self._device)  # (P, 35) each
        return list(zip(tokens["input_ids"], tokens["attention_mask"]))

    def _score_batch(self, pixels: torch.Tensor,
                     text_entries: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, vision width)
        input_ids = torch.stack([ids for ids, _ in text_entries])
        attention_mask = torch.stack([mask for _, mask in text_entries])
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=pixels.device)
        text_out = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                             encoder_attention_mask=image_mask)
        cls = text_out.last_hidden_state[:, 0, :].float()  # (B, 768)
        with torch.autocast(device_type=pixels.device.type, enabled=False):
            reward = self.head(cls).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD


def imagereward_scorer(weights_dir: Path | None, device: str = "cpu", *, batch_size: int = 32) -> ImageRewardScorer:
    if weights_dir is None:
        raise ValueError("scorer 'imagereward' needs weights: pass weights_dir=<directory holding ImageReward.pt, "
                         "med_config.json and bert-base-uncased/>")
    ckpt = require_file("imagereward", Path(weights_dir) / "ImageReward.pt", SOURCE)
    med_config = require_file("imagereward", Path(weights_dir) / "med_config.json", SOURCE)
    vocab = require_file("imagereward", Path(weights_dir) / "bert-base-uncased" / "vocab.txt", TOKENIZER_SOURCE)
    vision_state, text_state, mlp_state = split_imagereward_state_dict(load_state_dict_file(ckpt))
    vision = BlipVisionModel(vision_config_from(vision_state, ckpt))
    load_into(vision, vision_state, ckpt)
    text = BlipTextModel(text_config_from(med_config, vision.config.hidden_size), add_pooling_layer=False)
    load_into(text, text_state, ckpt)
    head = ScoreMLP(text.config.hidden_size)
    load_into(head, mlp_state, ckpt)
    tokenizer = BertTokenizer.from_pretrained(vocab.parent, local_files_only=True)
    version = f"imagereward-code{IMAGEREWARD_CODE_VERSION}+{file_digest(ckpt, med_config)}"
    return ImageRewardScorer(version, vision, text, head, tokenizer, device=device, batch_size=batch_size)
