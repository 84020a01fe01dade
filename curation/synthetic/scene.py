"""Procedural 64 px scenes for the synthetic sample (curation.synthetic.sample), with three properties a pixel scorer
can measure: the object's colour, sharpness (Gaussian blur; seen by the variance of the Laplacian of the grey
image) and exposure (a gamma; seen by the distance of mean luminance from mid-grey)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


SHAPES = ("ellipse", "rectangle", "triangle", "diamond")
MID_GREY = 128.0  # luminance (0-255) a neutrally exposed scene is composed to average


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 709 luma of (..., 3) RGB in 0-255, the grey the pixel scorers use."""
    return rgb[..., 0] * 0.2126 + rgb[..., 1] * 0.7152 + rgb[..., 2] * 0.0722


def _draw_object(canvas: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], half: float,
                 fill: int | tuple[int, int, int], outline: tuple[int, int, int] | None) -> None:
    """Draw one object of the given shape inside the square of half-width `half` (px) around centre."""
    cx, cy = centre
    left, top, right, bottom = cx - half, cy - half, cx + half, cy + half
    if shape == "ellipse":
        canvas.ellipse([left, top, right, bottom], fill=fill, outline=outline, width=2)
    elif shape == "rectangle":
        canvas.rectangle([left, top + 0.15 * half, right, bottom - 0.15 * half], fill=fill, outline=outline, width=2)
    elif shape == "triangle":
        canvas.polygon([(cx, top), (right, bottom), (left, bottom)], fill=fill, outline=outline, width=2)
    elif shape == "diamond":
        canvas.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=fill, outline=outline, width=2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(rgb: tuple[int, int, int], shape: str, blur_radius: float, exposure: float, size: int,
                 rng: np.random.Generator) -> Image.Image:
    """One size x size scene: a 4 px checker of +-28 grey levels on a desaturated background, one object in
    `rgb` (~30-45 % of the area) with a dark outline, then Gaussian blur, then a gamma of 2**-exposure
    (exposure +1 lifts mid-grey 128 to 180, -1 drops it to 64). The background's brightness is chosen so the
    scene averages MID_GREY before the gamma."""
    centre = (float(rng.uniform(0.42, 0.58) * size), float(rng.uniform(0.42, 0.58) * size))
    half = float(rng.uniform(0.31, 0.36) * size)
    mask = Image.new("L", (size, size), 0)
    _draw_object(ImageDraw.Draw(mask), shape, centre, half, 255, None)
    object_share = np.asarray(mask).mean() / 255
    object_lum = luminance(np.array(rgb, dtype=np.float64))
    background_lum = np.clip((MID_GREY - object_share * object_lum) / (1 - object_share), 45, 210)
    tint = 1 + rng.uniform(-0.08, 0.08, 3)  # a faint hue, far less saturated than any palette colour
    yy, xx = np.mgrid[0:size, 0:size]
    checker = (((yy // 4 + xx // 4) % 2) * 2 - 1)[..., None] * 28.0  # (size, size, 1), zero-mean texture
    background = np.clip(background_lum * tint / luminance(tint) + checker, 0, 255)
    image = Image.fromarray(np.rint(background).astype(np.uint8), "RGB")
    _draw_object(ImageDraw.Draw(image), shape, centre, half, rgb, tuple(int(c * 0.35) for c in rgb))
    if blur_radius > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur_radius))
    exposed = 255.0 * (np.asarray(image, dtype=np.float64) / 255.0) ** (2.0 ** -exposure)  # gamma keeps the hue
    return Image.fromarray(np.clip(np.rint(exposed), 0, 255).astype(np.uint8), "RGB")
