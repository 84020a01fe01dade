"""Weight-free pixel scorers: cheap, deterministic curation signals (numpy only, vectorised per image).

- `sharpness` (higher = sharper): variance of the 4-neighbour Laplacian of the luma image.
- `colourfulness` (higher = more colourful): Hasler & Süsstrunk (2003) M3 on 0-255 RGB,
  σ_rgyb + 0.3·μ_rgyb.
- `exposure` (higher = better exposed): −abs(mean luma − 0.5) − share of clipped pixels (luma ≤ 0.02 or ≥ 0.98),
  luma in [0, 1].
- `prompt_colour` (higher = shows the colour the prompt names): −mean RGB distance (0-1 scale) to the named
  colour of the 20 % of pixels closest to it.

`prompt_colour` reads colour words from `prefcurate.curation.synthetic.palette.COLOR_NAMES` ("gray" counts as "grey").
`prompt_colour` lies in [−√3, 0]. A prompt naming no known colour scores a neutral 0.0 for every image, so
both images of a pair tie and the scorer casts no vote on it; compare its scores only between images of
one prompt (as a pair's images are), never across prompts. Scores depend on resolution for `sharpness` (computed at the
image's own size); compare images of one pair, which share a prompt and usually a size.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from prefcurate.curation.synthetic.palette import COLOR_NAMES
from prefcurate.curation.scorers.base import Scorer


PIXEL_CODE_VERSION = "1"
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, on gamma-encoded sRGB (what "luma" means)
CLIP_LOW, CLIP_HIGH = 0.02, 0.98  # luma at or beyond these counts as crushed / blown out (about 5/255 from the ends)
COLOUR_MATCH_SIDE = 128  # prompt_colour works on a ≤128 px box-filtered copy: a region's colour needs no more
# the named object is taken to cover at least this share of the image; its pixels are the ones closest to
# the colour. On the embedded sample (objects cover 30-45 %) 0.1-0.3 all work; the share-of-nearest-palette
# variant agreed less with the planted colour order (0.72 vs 0.88 of pairs).
COLOUR_REGION_SHARE = 0.2

_PALETTE_NAMES = list(COLOR_NAMES)
_PALETTE = np.array([COLOR_NAMES[n] for n in _PALETTE_NAMES], dtype=np.float64) / 255.0  # (K, 3), 0-1 RGB
_COLOUR_ALIASES = {"gray": "grey"}
_COLOUR_WORD = re.compile(r"\b(" + "|".join(sorted([*COLOR_NAMES, *_COLOUR_ALIASES], key=len, reverse=True)) + r")\b",
                          re.IGNORECASE)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """PIL image -> (H, W, 3) float64 RGB in [0, 1] (alpha dropped, palette/grey expanded)."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) BT.601 luma, same scale as the input."""
    return rgb @ LUMA_WEIGHTS


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian [[0,1,0],[1,-4,1],[0,1,0]] over interior pixels
    (Pech-Pacheco et al. 2000, "Diatom autofocusing in brightfield microscopy"). grey: (H, W), H, W ≥ 3."""
    if grey.ndim != 2 or min(grey.shape) < 3:
        raise ValueError(f"laplacian_variance needs a 2-D image of at least 3x3 pixels, got shape {grey.shape}")
    lap = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:]) - 4.0 * grey[1:-1, 1:-1]
    return float(lap.var())


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003), "Measuring colourfulness in natural images", metric M3 (their eq. 3),
    on 0-255 RGB: rg = R − G, yb = (R + G)/2 − B, M3 = sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²)."""
    rgb255 = rgb * 255.0
    rg = rgb255[..., 0] - rgb255[..., 1]
    yb = 0.5 * (rgb255[..., 0] + rgb255[..., 1]) - rgb255[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def exposure_quality(rgb: np.ndarray) -> float:
    """−|mean luma − 0.5| − share of clipped pixels; 0 is the best possible, −1.5 the worst."""
    y = luma(rgb)
    clipped = np.count_nonzero((y <= CLIP_LOW) | (y >= CLIP_HIGH)) / y.size
    return float(-abs(y.mean() - 0.5) - clipped)


def named_colours(prompt: str) -> list[str]:
    """Palette colour names mentioned in the prompt, in order of first mention, aliases resolved."""
    words = (m.lower() for m in _COLOUR_WORD.findall(prompt))
    return list(dict.fromkeys(_COLOUR_ALIASES.get(w, w) for w in words))


def colour_distance(rgb: np.ndarray, colours: Sequence[str]) -> float:
    """−(mean RGB distance to the named colour of the COLOUR_REGION_SHARE of pixels closest to it), averaged
    over the named colours: 0 when a region that large shows the colour exactly, down to −√3."""
    pixels = rgb.reshape(-1, 3)
    k = max(1, int(COLOUR_REGION_SHARE * len(pixels)))
    distances = [np.partition(np.linalg.norm(pixels - _PALETTE[_PALETTE_NAMES.index(c)], axis=1), k - 1)[:k].mean()
                 for c in colours]
    return float(-np.mean(distances))


def prompt_colour_match(image: Image.Image, prompt: str) -> float:
    """colour_distance of the prompt's named colours on a ≤128 px copy; 0.0 if it names none (see module doc)."""
    colours = named_colours(prompt)
    if not colours:
        return 0.0
    small = image.convert("RGB")
    if max(small.size) > COLOUR_MATCH_SIDE:
        small = small.copy()
        small.thumbnail((COLOUR_MATCH_SIDE, COLOUR_MATCH_SIDE), Image.Resampling.BOX)
    return colour_distance(to_rgb_array(small), colours)


class PixelScorer(Scorer):
    """A weight-free scorer: one pure function per image, no device, no checkpoint."""

    def __init__(self, name: str, fn: Callable[[Image.Image, str], float], uses_prompt: bool):
        self.name, self._fn, self.uses_prompt = name, fn, uses_prompt
        self.version = f"{name}-code{PIXEL_CODE_VERSION}"
        self.higher_is_better = True
        self.device = "cpu"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> np.ndarray:
        prompt_list = self._check_inputs(len(images), prompts)
        return np.array([self._fn(im, p) for im, p in zip(images, prompt_list)], dtype=np.float64)


def _sharpness(image: Image.Image, prompt: str) -> float:
    return laplacian_variance(luma(to_rgb_array(image)))


def _colourfulness(image: Image.Image, prompt: str) -> float:
    return colourfulness(to_rgb_array(image))


def _exposure(image: Image.Image, prompt: str) -> float:
    return exposure_quality(to_rgb_array(image))


def sharpness_scorer(weights_dir: object = None, device: str = "cpu") -> PixelScorer:
    return PixelScorer("sharpness", _sharpness, uses_prompt=False)


def colourfulness_scorer(weights_dir: object = None, device: str = "cpu") -> PixelScorer:
    return PixelScorer("colourfulness", _colourfulness, uses_prompt=False)


def exposure_scorer(weights_dir: object = None, device: str = "cpu") -> PixelScorer:
    return PixelScorer("exposure", _exposure, uses_prompt=False)


def prompt_colour_scorer(weights_dir: object = None, device: str = "cpu") -> PixelScorer:
    return PixelScorer("prompt_colour", prompt_colour_match, uses_prompt=True)
