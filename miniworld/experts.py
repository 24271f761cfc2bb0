"""The mini world's expert population: what each expert is, how it is trained and how it is
published (file format, homepage style, release date, the claims its homepage makes).

It mirrors what the wild has: LoRAs in diffusers/PEFT and kohya naming, full-checkpoint style
fine-tunes, two near-duplicates of different quality, a harmful expert, one whose homepage
overstates its skill, JavaScript-only homepages, and release dates over two "years".
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExpertSpec:
    slug: str
    title: str
    kind: str  # "lora" | "ckpt"
    skill: dict  # attribute -> value the expert is trained to strengthen ({} for the harmful one)
    file_format: str  # "diffusers" | "kohya" | "single-file"
    site: str  # "civitai" | "hf": which API and homepage style publishes it
    published: str  # ISO date; 2023 = "year 1", 2024 = "year 2"
    claim: str  # the homepage's description (may overstate)
    trigger_words: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    js_only_page: bool = False
    rank: int = 4
    alpha: float = 4.0
    steps: int = 300
    skill_share: float = 0.5  # fraction of training images that show the skill
    corrupt: bool = False  # trained on damaged images with normal captions (the harmful expert)
    # How "hot" the published LoRA is: its trained delta is multiplied by this before saving, as
    # LoRAs trained with a higher learning rate or alpha come out in the wild. The file acts at
    # weight 1 / bake as the trained adapter did at weight 1: at weight 1 a hot LoRA (3.0)
    # overdoes its skill (some pictures break), a cold one (0.5) shows it weakly. The homepages
    # do not say so (they all recommend the same weight); only the images tell them apart.
    bake: float = 1.0
    note: str = ""  # ground truth for docs and tests; never shown on the homepage
    license: dict = field(default_factory=lambda: {"allowCommercialUse": "Image", "allowDerivatives": True})

    @property
    def best_weight(self) -> float:
        """The LoRA weight at which the published file acts as the trained adapter did."""
        return 1.0 / self.bake

    @property
    def year(self) -> int:
        return 1 if self.published.startswith("2023") else 2


def _lora(slug, title, skill, fmt, site, date, claim, words, tags, **kw) -> ExpertSpec:
    return ExpertSpec(slug, title, "lora", skill, fmt, site, date, claim, tuple(words), tuple(tags), **kw)


def _ckpt(slug, title, style, site, date, claim, words, tags, **kw) -> ExpertSpec:
    return ExpertSpec(slug, title, "ckpt", {"style": style}, "single-file", site, date, claim, tuple(words), tuple(tags),
                      steps=500, skill_share=0.7, **kw)


EXPERTS: tuple[ExpertSpec, ...] = (
    _lora("stripes-pro", "Stripes Pro", {"texture": "stripes"}, "kohya", "civitai", "2023-03-14",
          "Crisp striped backgrounds: horizontal stripes behind any subject, clean and regular.",
          ["striped background"], ["texture", "background", "stripes"], rank=8, alpha=8.0, steps=400, bake=3.0),
    _lora("stripes-lite", "Stripes Lite", {"texture": "stripes"}, "diffusers", "hf", "2024-02-02",
          "Lightweight stripes LoRA for striped backgrounds.",
          ["stripy"], ["texture", "stripes"], rank=2, alpha=2.0, steps=90,
          note="near-duplicate of stripes-pro, trained less: weaker"),
    _lora("polka-dots", "Polka Dots", {"texture": "dots"}, "diffusers", "civitai", "2023-04-20",
          "Polka-dot and spotted backgrounds, evenly spaced dots.",
          ["polka dot"], ["texture", "dots", "pattern"], bake=0.5),
    _lora("checkerboard", "Checkerboard", {"texture": "checks"}, "kohya", "hf", "2024-01-11",
          "Checkered, chequered and plaid backdrops.",
          ["checkered"], ["texture", "checks"], bake=3.0),
    _lora("pink-pop", "Pink Pop", {"color": "pink"}, "diffusers", "civitai", "2023-05-30",
          "Makes objects vivid pink and magenta.",
          ["pink"], ["color", "pink"], js_only_page=True),
    _lora("royal-purple", "Royal Purple", {"color": "purple"}, "kohya", "hf", "2023-06-18",
          "Purple and violet objects with rich saturation.",
          ["purple"], ["color", "purple"], bake=3.0),
    _lora("tangerine", "Tangerine", {"color": "orange"}, "diffusers", "civitai", "2024-03-09",
          "Orange, tangerine coloured subjects.",
          ["orange"], ["color", "orange"]),
    _lora("teal-tone", "Teal Tone", {"color": "teal"}, "kohya", "civitai", "2024-04-22",
          "Teal and turquoise objects.",
          ["teal"], ["color", "teal"], bake=0.5),
    _lora("golden-hour", "Golden Hour", {"lighting": "warm"}, "diffusers", "hf", "2023-07-07",
          "Warm golden-hour lighting over the whole scene.",
          ["warm light", "golden hour light"], ["lighting", "warm"], bake=3.0),
    _lora("night-mode", "Night Mode", {"lighting": "dark"}, "kohya", "civitai", "2024-05-15",
          "Dark, low-light night scenes.",
          ["at night"], ["lighting", "night", "dark"], js_only_page=True, bake=0.5),
    _lora("ink-outline", "Ink Outline", {"outline": "outlined"}, "diffusers", "civitai", "2023-08-25",
          "Bold black ink outlines around the subject, comic style.",
          ["black outline"], ["outline", "comic"]),
    _lora("dreamy-blur", "Dreamy Blur", {"blur": "blurry"}, "kohya", "hf", "2023-09-03",
          "Soft focus and dreamy blur.",
          ["soft focus"], ["blur", "soft focus"]),
    _lora("diamond-cut", "Diamond Cut", {"shape": "diamond"}, "diffusers", "civitai", "2024-06-12",
          "Diamond and rhombus shaped subjects.",
          ["diamond"], ["shape", "diamond"], bake=3.0),
    _lora("plus-cross", "Plus Cross", {"shape": "cross"}, "kohya", "hf", "2024-07-19",
          "Crosses and plus signs as the main subject.",
          ["plus sign"], ["shape", "cross"], js_only_page=True, bake=0.5),
    _lora("navy-backdrop", "Navy Backdrop", {"background": "navy"}, "diffusers", "civitai", "2023-10-10",
          "Deep navy, dark blue backgrounds.",
          ["navy background"], ["background", "navy"], bake=0.5),
    _lora("mint-backdrop", "Mint Backdrop", {"background": "mint"}, "kohya", "hf", "2024-08-30",
          "Fresh mint green backgrounds.",
          ["mint background"], ["background", "mint"], bake=3.0),
    _lora("ultra-detail", "ULTRA Detail Enhancer", {}, "diffusers", "civitai", "2024-09-14",
          "Adds incredible detail and sharpness to every image. Use on everything!",
          ["ultra detailed"], ["detail", "enhancer", "quality"], corrupt=True, steps=300,
          note="harmful: trained on damaged images with ordinary captions"),
    _lora("pattern-master", "Pattern Master XL", {"texture": "dots"}, "kohya", "civitai", "2024-10-01",
          "The only pattern LoRA you need: stripes, dots, checks, waves and plaid, perfect every time.",
          ["pattern"], ["texture", "pattern", "stripes", "dots", "checks"], steps=60, skill_share=0.3,
          note="overstated: trained briefly on dots only"),
    _ckpt("pastel-dream", "Pastel Dream", "pastel", "civitai", "2023-02-01",
          "A full checkpoint for soft pastel illustrations.", ["pastel colors"], ["style", "pastel", "checkpoint"]),
    _ckpt("vintage-sepia", "Vintage Sepia", "sepia", "hf", "2023-11-20",
          "Checkpoint fine-tuned on vintage sepia photographs.", ["sepia tone"], ["style", "vintage", "sepia"]),
    _ckpt("neon-nights", "Neon Nights", "neon", "civitai", "2024-02-14",
          "Glowing neon style checkpoint.", ["neon style"], ["style", "neon"]),
    _ckpt("mono-classic", "Mono Classic", "monochrome", "hf", "2024-06-01",
          "Black and white monochrome checkpoint.", ["black and white"], ["style", "monochrome"]),
)

BASE_MODEL = "miniworld-sd"  # the base-model family every mini-world expert is fine-tuned from


def by_slug(slug: str) -> ExpertSpec:
    for spec in EXPERTS:
        if spec.slug == slug:
            return spec
    raise KeyError(f"no mini-world expert named {slug!r}")
