"""The mini world's synthetic image domain: attributes, a renderer, captions and a parser.

Every image is drawn from an attribute dict, so the ground truth of every picture is known.
That is what lets the mini scorers be trained and checked, and what lets experts be built that
strengthen one measurable skill each. The base model is trained on a skewed distribution in
which the "rare" values below appear seldom, so it renders them badly on purpose.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32

# attribute -> values. The first value of an optional attribute is its default ("plain",
# "normal"...), which a prompt implies when it does not mention the attribute.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "diamond", "cross"),
    "color": ("red", "green", "blue", "yellow", "white", "pink", "purple", "orange", "teal"),
    "background": ("white", "gray", "black", "beige", "navy", "mint"),
    "texture": ("plain", "stripes", "dots", "checks"),
    "lighting": ("normal", "warm", "dark"),
    "blur": ("sharp", "blurry"),
    "outline": ("none", "outlined"),
    "style": ("normal", "pastel", "sepia", "neon", "monochrome"),
}
OPTIONAL = ("texture", "lighting", "blur", "outline", "style")
RARE: dict[str, tuple[str, ...]] = {
    "shape": ("diamond", "cross"),
    "color": ("pink", "purple", "orange", "teal"),
    "background": ("navy", "mint"),
    "texture": ("stripes", "dots", "checks"),
    "lighting": ("warm", "dark"),
    "blur": ("blurry",),
    "outline": ("outlined",),
    "style": ("pastel", "sepia", "neon", "monochrome"),
}

RGB = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "white": (245, 245, 245), "pink": (255, 120, 190), "purple": (140, 50, 190),
    "orange": (250, 140, 30), "teal": (20, 160, 160), "gray": (128, 128, 128),
    "black": (20, 20, 20), "beige": (225, 205, 165), "navy": (20, 30, 100), "mint": (160, 235, 200),
}

# Words a prompt may use for each value (the first is the canonical caption word).
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "circle": ("circle", "disc", "round dot shape"), "square": ("square", "box shape"),
        "triangle": ("triangle", "triangular shape"), "diamond": ("diamond", "rhombus"),
        "cross": ("cross", "plus sign"),
    },
    "color": {
        "red": ("red", "crimson"), "green": ("green", "emerald"), "blue": ("blue", "cobalt"),
        "yellow": ("yellow", "lemon"), "white": ("white", "snow white"),
        "pink": ("pink", "magenta"), "purple": ("purple", "violet"),
        "orange": ("orange", "tangerine"), "teal": ("teal", "turquoise"),
    },
    "background": {
        "white": ("white",), "gray": ("gray", "grey"), "black": ("black", "jet black"),
        "beige": ("beige", "sand"), "navy": ("navy", "dark blue"), "mint": ("mint", "mint green"),
    },
    "texture": {
        "plain": ("plain",), "stripes": ("striped", "stripy", "pinstriped"),
        "dots": ("dotted", "polka dot", "spotted"), "checks": ("checkered", "chequered", "plaid"),
    },
    "lighting": {
        "normal": ("evenly lit",), "warm": ("warm light", "golden hour light", "warm glow"),
        "dark": ("at night", "dim light", "low light"),
    },
    "blur": {"sharp": ("sharp focus",), "blurry": ("blurry", "out of focus", "soft focus")},
    "outline": {"none": ("no outline",), "outlined": ("with a black outline", "bold outlines", "outlined")},
    "style": {
        "normal": ("natural colors",), "pastel": ("pastel colors", "soft pastel style"),
        "sepia": ("vintage sepia photo", "sepia tone", "old photograph style"),
        "neon": ("neon style", "glowing neon"), "monochrome": ("black and white", "monochrome"),
    },
}

WILD_FILLERS = (
    "masterpiece", "best quality", "highly detailed", "award winning", "4k", "trending on artstation",
    "intricate", "professional", "beautiful composition", "octane render", "centered",
)


@dataclass(frozen=True)
class Scene:
    """One image's ground truth plus the layout jitter that makes images differ."""

    attrs: dict
    dx: int = 0
    dy: int = 0
    size: int = 22


# Hand-written requests, one or two rare values each, phrased as people type them: what the load
# benchmark and the server tests send (one list, so a benchmark figure and a test mean the same load).
EXAMPLE_REQUESTS = (
    "a pink circle on a striped white background", "a teal diamond on a mint background",
    "vintage sepia photo of a red square on a beige background", "a purple triangle at night",
    "neon style blue cross on a black background", "an orange circle on a polka dot background",
    "a green square on a checkered gray background, warm light", "pastel colors yellow triangle",
    "a blurry white circle on a navy background", "a red cross with a black outline",
    "black and white photo of a blue diamond", "a pink square on a dotted beige background",
    "golden hour light over a teal circle", "a purple diamond on a striped mint background",
    "vintage sepia photo of a green cross", "neon style orange square at night",
    "a yellow circle on a navy background, blurry", "pastel colors pink diamond on a white background",
    "a teal triangle with bold outlines on a checkered background", "an orange diamond on a gray background",
)


def sample_attrs(rng: random.Random, rare_rate: float = 0.06, force: dict | None = None, uniform: bool = False) -> dict:
    """Draw attributes from the skewed "in the wild" distribution, or uniformly.

    Skewed: shape, colour and background take a rare value with probability ``rare_rate`` per
    rare value (capped at 0.9), the optional attributes with probability ``rare_rate``; so rare
    values stay rare for the base model. Uniform (for the scorers, which must know every value
    equally well): every value of every attribute equally likely. ``force`` pins attributes
    (an expert's skill).
    """
    attrs = {}
    for name, values in ATTRIBUTES.items():
        rare = RARE[name]
        common = [v for v in values if v not in rare]
        p_rare = min(0.9, rare_rate * (len(rare) if name in ("shape", "color", "background") else 1))
        if uniform:
            attrs[name] = rng.choice(values)
        elif rng.random() < p_rare:
            attrs[name] = rng.choice(rare)
        else:
            attrs[name] = rng.choice(common)
    if attrs["color"] == attrs["background"]:
        attrs["background"] = "gray" if attrs["color"] != "gray" else "white"
    attrs.update(force or {})
    if attrs["color"] == attrs["background"]:
        attrs["background"] = "black" if attrs["color"] == "white" else "white"
    return attrs


def sample_scene(rng: random.Random, **kw) -> Scene:
    return Scene(sample_attrs(rng, **kw), dx=rng.randint(-2, 2), dy=rng.randint(-2, 2), size=rng.randint(18, 24))


def _shape_polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]] | None:
    h = s / 2
    if shape == "square":
        return [(cx - h * 0.85, cy - h * 0.85), (cx + h * 0.85, cy - h * 0.85), (cx + h * 0.85, cy + h * 0.85), (cx - h * 0.85, cy + h * 0.85)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h * 0.8, cy), (cx, cy + h), (cx - h * 0.8, cy)]
    if shape == "cross":
        t = h * 0.38
        return [(cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t), (cx + h, cy + t), (cx + t, cy + t),
                (cx + t, cy + h), (cx - t, cy + h), (cx - t, cy + t), (cx - h, cy + t), (cx - h, cy - t), (cx - t, cy - t)]
    return None


def _texture(bg: np.ndarray, texture: str) -> np.ndarray:
    """Overlay a pattern in a contrasting tone of the background colour."""
    if texture == "plain":
        return bg
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if texture == "stripes":
        mask = (yy // 4) % 2 == 0
    elif texture == "dots":
        mask = ((yy % 8 - 3.5) ** 2 + (xx % 8 - 3.5) ** 2) <= 5.0
    else:  # checks
        mask = ((yy // 8) + (xx // 8)) % 2 == 0
    lum = bg.mean()
    tone = bg * 0.45 if lum > 90 else bg * 0.4 + 150
    out = bg.copy()
    out[mask] = tone[mask]
    return out


def render(scene: Scene) -> Image.Image:
    """Draw a scene as a 32x32 RGB image (deterministic for a scene)."""
    a = scene.attrs
    bg = np.empty((SIZE, SIZE, 3), np.float32)
    bg[:] = RGB[a["background"]]
    img = Image.fromarray(_texture(bg, a["texture"]).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx, cy, s = SIZE / 2 + scene.dx, SIZE / 2 + scene.dy, scene.size
    outline = (0, 0, 0) if a["outline"] == "outlined" else None
    width = 2 if outline else 0
    poly = _shape_polygon(a["shape"], cx, cy, s)
    if poly is None:
        r = s / 2 * 0.9
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=RGB[a["color"]], outline=outline, width=width)
    else:
        draw.polygon(poly, fill=RGB[a["color"]], outline=outline, width=width)
    arr = np.asarray(img, np.float32)
    arr = _style(arr, a["style"])
    if a["lighting"] == "warm":
        arr = arr * np.array([1.15, 0.95, 0.6], np.float32) + np.array([25, 10, 0], np.float32)
    elif a["lighting"] == "dark":
        arr = arr * 0.35
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if a["blur"] == "blurry":
        img = img.filter(ImageFilter.GaussianBlur(1.6))
    return img


def _style(arr: np.ndarray, style: str) -> np.ndarray:
    gray = arr @ np.array([0.299, 0.587, 0.114], np.float32)
    if style == "pastel":
        return arr * 0.45 + 255 * 0.55
    if style == "sepia":
        return gray[..., None] * np.array([1.07, 0.74, 0.43], np.float32) + np.array([30, 25, 10], np.float32)
    if style == "neon":
        mean = arr.mean(axis=2, keepdims=True)
        return (arr - mean) * 2.2 + mean * 0.5
    if style == "monochrome":
        return np.repeat(((gray - 128) * 1.3 + 128)[..., None], 3, axis=2)
    return arr


def to_tensor_array(images: list[Image.Image]) -> np.ndarray:
    """Images -> float32 array (N, 3, H, W) in [-1, 1], the diffusion convention."""
    arr = np.stack([np.asarray(im, np.float32) for im in images]) / 127.5 - 1.0
    return arr.transpose(0, 3, 1, 2)


# ---------------------------------------------------------------- captions

def _word(rng: random.Random, attr: str, value: str) -> str:
    return rng.choice(SYNONYMS[attr][value])


def caption(attrs: dict, rng: random.Random, mention_defaults: float = 0.15, wild: float = 0.15) -> str:
    """Describe attrs in natural language with varied templates, synonyms and word order.

    Optional attributes at their default are mentioned only sometimes, as people do.
    """
    color = _word(rng, "color", attrs["color"])
    shape = _word(rng, "shape", attrs["shape"])
    bgw = _word(rng, "background", attrs["background"])
    tex = attrs["texture"]
    texw = _word(rng, "texture", tex) if tex != "plain" or rng.random() < mention_defaults else ""
    bgphrase = f"{texw} {bgw}".strip()
    mods = []
    for name in ("lighting", "blur", "outline", "style"):
        value = attrs[name]
        if value != ATTRIBUTES[name][0] or rng.random() < mention_defaults:
            mods.append(_word(rng, name, value))
    rng.shuffle(mods)
    templates = (
        "a {color} {shape} on a {bg} background",
        "{color} {shape}, {bg} background",
        "a {bg} background with a {color} {shape}",
        "an image of a {color} {shape} against a {bg} backdrop",
        "{shape} in {color} on a {bg} background",
    )
    text = rng.choice(templates).format(color=color, shape=shape, bg=bgphrase)
    if mods:
        joiner = rng.choice([", ", ", ", " with "]) if len(mods) == 1 else ", "
        text = f"{text}{joiner}{', '.join(mods)}" if rng.random() < 0.75 else f"{', '.join(mods)}, {text}"
    if rng.random() < wild:
        fill = rng.sample(WILD_FILLERS, rng.randint(2, 4))
        text = f"{', '.join(fill[:2])}, {text}, {', '.join(fill[2:]) or 'detailed'}"
    return text


# ---------------------------------------------------------------- parsing

def _phrase_pattern(phrase: str) -> str:
    return r"(?<![a-z])" + re.escape(phrase) + r"(?![a-z])"


def parse_prompt(text: str) -> dict:
    """Recover the attributes a prompt asks for (mentioned ones only).

    Colour words bind to the background when "background"/"backdrop" follows within a few
    words, or when a colour word comes after "background"; otherwise to the object.
    """
    t = " " + text.lower() + " "
    found: dict[str, str] = {}
    for attr in ("shape", "texture", "lighting", "blur", "outline", "style"):
        best = None
        for value, words in SYNONYMS[attr].items():
            for w in words:
                m = re.search(_phrase_pattern(w), t)
                if m and (best is None or len(w) > best[1]):
                    best = (value, len(w), m.start())
        if best:
            found[attr] = best[0]
    # colours: collect every colour mention with its position, longest phrase first
    mentions: list[tuple[int, int, str, str]] = []  # start, end, kind-candidates, value
    taken = [False] * len(t)
    vocab = [(w, "background", v) for v, ws in SYNONYMS["background"].items() for w in ws]
    vocab += [(w, "color", v) for v, ws in SYNONYMS["color"].items() for w in ws]
    for w, kind, value in sorted(vocab, key=lambda x: -len(x[0])):
        for m in re.finditer(_phrase_pattern(w), t):
            if any(taken[m.start():m.end()]):
                continue
            if w in ("black", "white") and "black and white" in t[max(0, m.start() - 10):m.end() + 10]:
                continue
            mentions.append((m.start(), m.end(), kind, value))
            for i in range(m.start(), m.end()):
                taken[i] = True
    for start, end, _kind, value in sorted(mentions):
        after = t[end:end + 30]
        before = t[max(0, start - 14):start]
        is_bg = bool(re.match(r"^\s*(?:(?:striped|stripy|pinstriped|dotted|polka dot|spotted|checkered|chequered|plaid|plain)\s+)?(?:background|backdrop)", after)) \
            or bool(re.search(r"background\s*$", before))
        if is_bg and value in ATTRIBUTES["background"] and "background" not in found:
            found["background"] = value
        elif not is_bg and value in ATTRIBUTES["color"] and "color" not in found:
            found["color"] = value
    return found


def target_attrs(text: str) -> dict:
    """What an image for this prompt should show: mentioned attributes plus the defaults of
    optional attributes the prompt leaves out (nobody asking for a plain scene wants stripes)."""
    found = parse_prompt(text)
    for name in OPTIONAL:
        found.setdefault(name, ATTRIBUTES[name][0])
    return found
