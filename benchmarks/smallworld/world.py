"""A small text-to-image world whose true reward is known: caption grammar, procedural images, pixel reward.

Captions come from a grammar, colour x object x style: ``"a red kite, photo"`` (9 colours x 10 objects x
3 style words = 270 captions). Style words are lexical only (they change no pixel): they make the text
encoder see varied captions without adding taste dimensions.

Images are the embedded sample's scenes (``prefcurate.curation.synthetic.scene.render_scene``) drawn at 32 px and
box-downsampled to ``IMAGE_SIZE`` (16 px): one object of a colour on a checkered, desaturated background, with
a Gaussian blur (radius in 32-px units) and an exposure gamma. The pretraining set draws the named colour
only with probability ``1 - wrong_colour_rate`` and blur and exposure uniformly, so the base model learns a
distribution whose samples vary on all three taste dimensions: there is something for preference
fine-tuning to gain.

The true reward is the embedded sample's majority utility (``prefcurate.curation.synthetic.sample.majority_utility``,
U = 0.45 colour_match + 0.35 sharpness + 0.20 exposure_quality), with each property *measured from pixels*
(generated images have no planted parameters):

- colour_match = max(0, 1 - |c - named| / 255), c = mean RGB (gamma undone) of the most saturated 25 % of
  pixels (the object: the background is desaturated);
- sharpness = clip(a + b * log(energy of the Laplacian / energy of the gradient), 0, 1): the high-frequency
  share of the image's detail, mapped onto 1 - blur/max_blur by a least-squares fit on rendered images (``calibrate``);
- exposure_quality = 1 - |e| / max_exposure, e = -log2(ln m / ln(128/255)) from the mean luminance m
  (the scene is composed to average mid-grey before the gamma 2**-e).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from prefcurate.curation.synthetic.palette import COLOR_NAMES
from prefcurate.curation.synthetic.sample import OBJECTS, PROMPT_COLOURS, SampleConfig, majority_utility
from prefcurate.curation.synthetic.scene import MID_GREY, luminance, render_scene


IMAGE_SIZE = 16  # px: the images the model generates and the reward reads
RENDER_SIZE = 32  # px: scenes are drawn here, then box-downsampled (the 4 px checker becomes 2 px)
STYLES = ("photo", "picture", "snapshot")
MAX_BLUR = 2.5  # px at RENDER_SIZE, the sample's max_blur_radius
MAX_EXPOSURE = 1.0  # the sample's max_exposure
UTILITY_WEIGHTS = SampleConfig().utility_weights  # (colour, sharpness, exposure) = (0.45, 0.35, 0.20)
OBJECT_SHARE = 0.25  # share of pixels taken as the object when measuring its colour (objects cover 30-45 %)
# sharpness = clip(SHARP_A + SHARP_B * high_frequency_share, 0, 1); fitted by calibrate() on 2000 renders
SHARP_A, SHARP_B = 0.2960, 0.4059


@dataclass(frozen=True)
class Caption:
    text: str
    colour: str  # a key of prefcurate.curation.synthetic.palette.COLOR_NAMES
    object: str  # a key of prefcurate.curation.synthetic.sample.OBJECTS


def all_captions() -> list[Caption]:
    """Every caption of the grammar, in a fixed order."""
    return [Caption(f"a {c} {o}, {s}", c, o) for c in PROMPT_COLOURS for o in OBJECTS for s in STYLES]


def split_captions(n_heldout: int, seed: int = 0) -> tuple[list[Caption], list[Caption]]:
    """(training captions, held-out captions): a seeded permutation; held-out ones never enter a pair."""
    captions = all_captions()
    order = np.random.default_rng(seed).permutation(len(captions))
    heldout = set(order[:n_heldout].tolist())
    return ([c for i, c in enumerate(captions) if i not in heldout], [captions[i] for i in sorted(heldout)])


def render(colour: str, obj: str, blur: float, exposure: float, rng: np.random.Generator) -> np.ndarray:
    """One scene, (IMAGE_SIZE, IMAGE_SIZE, 3) uint8: drawn at RENDER_SIZE, box-downsampled."""
    image = render_scene(COLOR_NAMES[colour], OBJECTS[obj], float(blur), float(exposure), RENDER_SIZE, rng)
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))


@dataclass(frozen=True)
class RenderedSet:
    images: np.ndarray  # (N, IMAGE_SIZE, IMAGE_SIZE, 3) uint8
    captions: list[Caption]
    drawn_colour: list[str]
    blur: np.ndarray  # (N,) px at RENDER_SIZE
    exposure: np.ndarray  # (N,)

    def planted_utility(self) -> np.ndarray:
        """The sample's utility from the planted parameters (what the pixel reward estimates)."""
        distance = np.array([np.linalg.norm(np.subtract(COLOR_NAMES[d], COLOR_NAMES[c.colour], dtype=float))
                             for d, c in zip(self.drawn_colour, self.captions, strict=True)])
        return majority_utility(np.maximum(0, 1 - distance / 255), 1 - self.blur / MAX_BLUR,
                                1 - np.abs(self.exposure) / MAX_EXPOSURE, UTILITY_WEIGHTS)


def render_set(n: int, wrong_colour_rate: float, seed: int, captions: list[Caption] | None = None) -> RenderedSet:
    """n scenes of random captions: the named colour with P = 1 - wrong_colour_rate (else another prompt
    colour), blur ~ U(0, MAX_BLUR), exposure ~ U(-MAX_EXPOSURE, MAX_EXPOSURE)."""
    rng = np.random.default_rng(seed)
    pool = captions or all_captions()
    chosen = [pool[i] for i in rng.integers(len(pool), size=n)]
    drawn = [c.colour if rng.random() >= wrong_colour_rate else
             str(rng.choice([x for x in PROMPT_COLOURS if x != c.colour])) for c in chosen]
    blur, exposure = rng.uniform(0, MAX_BLUR, n), rng.uniform(-MAX_EXPOSURE, MAX_EXPOSURE, n)
    images = np.stack([render(d, c.object, b, e, rng) for d, c, b, e in zip(drawn, chosen, blur, exposure)])
    return RenderedSet(images, chosen, drawn, blur, exposure)


# ---------------------------------------------------------------------------------------------- pixel reward

def _exposure_estimate(rgb: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N,) exposure e with mean luminance m = (128/255) ** (2 ** -e), clipped to ±2."""
    mean = np.clip(luminance(rgb.astype(np.float64)).mean(axis=(1, 2)) / 255.0, 1e-3, 1 - 1e-3)
    return np.clip(-np.log2(np.log(mean) / np.log(MID_GREY / 255.0)), -2.0, 2.0)


def high_frequency_share(rgb: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N,) log(energy of the 4-neighbour Laplacian of luma / energy of its horizontal and
    vertical differences): blur removes second-derivative energy faster than first-derivative energy, and the
    ratio does not change with the scene's contrast or exposure."""
    grey = luminance(rgb.astype(np.float64)) / 255.0
    lap = grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] - 4 * grey[:, 1:-1, 1:-1]
    gradient = (np.diff(grey, axis=1) ** 2).mean(axis=(1, 2)) + (np.diff(grey, axis=2) ** 2).mean(axis=(1, 2))
    return np.log((lap ** 2).mean(axis=(1, 2)) + 1e-10) - np.log(gradient + 1e-8)


def pixel_properties(rgb: np.ndarray, named: list[str]) -> dict[str, np.ndarray]:
    """(N, H, W, 3) uint8 images and each one's named colour -> colour_match, sharpness, exposure_quality,
    each (N,) in [0, 1] (see the module docstring)."""
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or len(named) != len(rgb):
        raise ValueError(f"need (N, H, W, 3) images and N colour names, got {rgb.shape} and {len(named)}")
    exposure = _exposure_estimate(rgb)
    linear = 255.0 * (rgb.astype(np.float64) / 255.0) ** (2.0 ** exposure)[:, None, None, None]  # gamma undone
    flat = linear.reshape(len(rgb), -1, 3)
    saturation = flat.max(axis=2) - flat.min(axis=2)  # (N, P)
    k = max(1, int(OBJECT_SHARE * flat.shape[1]))
    top = np.argsort(-saturation, axis=1)[:, :k]
    object_rgb = np.take_along_axis(flat, top[..., None], axis=1).mean(axis=1)  # (N, 3)
    target = np.array([COLOR_NAMES[c] for c in named], dtype=np.float64)
    return {
        "colour_match": np.maximum(0.0, 1 - np.linalg.norm(object_rgb - target, axis=1) / 255),
        "sharpness": np.clip(SHARP_A + SHARP_B * high_frequency_share(rgb), 0.0, 1.0),
        "exposure_quality": np.clip(1 - np.abs(exposure) / MAX_EXPOSURE, 0.0, 1.0),
    }


def true_reward(rgb: np.ndarray, named: list[str]) -> np.ndarray:
    """The majority's taste from pixels: (N, H, W, 3) uint8 -> (N,) U in [0, 1]."""
    p = pixel_properties(rgb, named)
    return majority_utility(p["colour_match"], p["sharpness"], p["exposure_quality"], UTILITY_WEIGHTS)


@functools.lru_cache(maxsize=1)
def calibrate(n: int = 2000, seed: int = 12345) -> tuple[float, float]:
    """Least-squares (a, b) of 1 - blur/MAX_BLUR ~ a + b * high_frequency_share on n rendered scenes."""
    scenes = render_set(n, wrong_colour_rate=0.0, seed=seed)
    x, y = high_frequency_share(scenes.images), 1 - scenes.blur / MAX_BLUR
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)
