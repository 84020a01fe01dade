"""Named colours shared by the sample generator (prompts name a colour) and the
prompt-colour-match pixel scorer (which looks for that colour in the image).

RGB values are 0-255 sRGB. Order matters only for deterministic sampling.
"""
from __future__ import annotations

COLOR_NAMES: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 45),
    "green": (45, 170, 65),
    "teal": (30, 150, 150),
    "blue": (45, 85, 215),
    "purple": (135, 55, 175),
    "pink": (240, 135, 185),
    "brown": (125, 80, 40),
    "white": (242, 242, 242),
    "black": (18, 18, 18),
    "grey": (128, 128, 128),
}
