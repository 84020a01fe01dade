"""Scorers: one float per (image, prompt), batched; neural ones load weights from local files only.

`build_scorer(name, weights_dir=DIR, device=...)` looks for these public files inside DIR:

| name          | files inside weights_dir                                | public source                           |
|---------------|---------------------------------------------------------|-----------------------------------------|
| `pickscore`   | `PickScore_v1/`: config.json, model.safetensors         | Hub `yuvalkirstain/PickScore_v1`        |
|               |   (or pytorch_model.bin)                                |                                         |
|               | `CLIP-ViT-H-14-laion2B-s32B-b79K/`:                     | Hub                                     |
|               |   preprocessor_config.json, vocab.json, merges.txt      | `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` |
| `hpsv2`       | `HPS_v2_compressed.pt` (open_clip ViT-H-14 state dict)  | Hub `xswu/HPSv2`                        |
| `hpsv2.1`     | `HPS_v2.1_compressed.pt`                                | Hub `xswu/HPSv2`                        |
| `clip`        | `vit_large_patch14_clip_224.openai/`:                   | Hub                                     |
|               |   open_clip_config.json, open_clip_model.safetensors    | `timm/vit_large_patch14_clip_224.openai` |
|               |   (or open_clip_pytorch_model.bin)                      |                                         |
| `aesthetic`   | `sac+logos+ava1-l14-linearMSE.pth` + the `clip` folder  | GitHub `christophschuhmann/`            |
|               |                                                         |   `improved-aesthetic-predictor`        |
| `imagereward` | `ImageReward.pt`, `med_config.json`                     | Hub `THUDM/ImageReward`                 |
|               | `bert-base-uncased/vocab.txt`                           | Hub `google-bert/bert-base-uncased`     |
| `sharpness`, `colourfulness`, `exposure`, `prompt_colour` | none (pixel statistics, see pixel.py) |   |

Options per factory (keyword arguments of build_scorer): `batch_size` for every neural scorer; `arch` for
hpsv2/hpsv2.1 (default "ViT-H-14"); `arch` + `checkpoint` (a .safetensors or .pt state dict of any open_clip
architecture) for clip and aesthetic instead of the ViT-L/14 directory. A missing file raises
`MissingWeightsError` naming the file and its source; a file in the wrong format raises `CheckpointFormatError`.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from importlib import import_module

from prefcurate.curation.scorers.base import CheckpointFormatError, MissingWeightsError, NeuralScorer, Scorer
from prefcurate.curation.scorers.pixel import (
    colourfulness_scorer, exposure_scorer, prompt_colour_scorer, sharpness_scorer,
)


def _lazy(module: str, factory: str, *args) -> Callable[..., Scorer]:
    """A factory that imports its module (open_clip, transformers: ~10 s) only when a scorer is built,
    so the pixel scorers, the CLI and every scheduled run that needs no neural scorer start fast."""
    def build(*call_args, **options):
        return getattr(import_module(module), factory)(*args, *call_args, **options)
    build.__name__ = factory
    return build


SCORERS: dict[str, Callable[..., Scorer]] = {
    "sharpness": sharpness_scorer,
    "colourfulness": colourfulness_scorer,
    "exposure": exposure_scorer,
    "prompt_colour": prompt_colour_scorer,
    "pickscore": _lazy("prefcurate.curation.scorers.pickscore", "pickscore_scorer"),
    "hpsv2": _lazy("prefcurate.curation.scorers.clip_family", "hps_scorer", "hpsv2"),
    "hpsv2.1": _lazy("prefcurate.curation.scorers.clip_family", "hps_scorer", "hpsv2.1"),
    "clip": _lazy("prefcurate.curation.scorers.clip_family", "clip_scorer"),
    "aesthetic": _lazy("prefcurate.curation.scorers.clip_family", "aesthetic_scorer"),
    "imagereward": _lazy("prefcurate.curation.scorers.imagereward", "imagereward_scorer"),
}


def build_scorer(name: str, weights_dir: str | Path | None = None, device: str = "cpu", **options) -> Scorer:
    """Build the scorer `name`, loading its checkpoint files (table above) from `weights_dir`. Never downloads."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; valid names: {', '.join(sorted(SCORERS))}")
    return SCORERS[name](None if weights_dir is None else Path(weights_dir), device, **options)


__all__ = ["SCORERS", "CheckpointFormatError", "MissingWeightsError", "NeuralScorer", "Scorer", "build_scorer"]
