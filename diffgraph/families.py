"""Base-model families: the architectures DiffGraph merges and renders, declared once.

A family names the model components of its pipeline (diffusers names), its core model (a UNet
for Stable Diffusion, a transformer for FLUX), the configs shipped for loading its single
files offline, how publishers spell it, and the two structural facts base detection
(merger/detect.py) needs to tell Stable Diffusion UNets apart: whether the first down block and
the first up block have attention. Built in: SD 1.5, SDXL and FLUX.1. Other packages add a
family through the ``diffgraph.families`` entry-point group, as the mini world adds its tiny SD.

It is also the one vocabulary of base names: :func:`base_family` turns any published spelling
("SD 1.5", "SD1", "Pony", "SDXL 1.0") into the family name the catalog, the vector partitions,
retrieval and every command use, while the published name is kept for display.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffgraph.registry import Registry


@dataclass(frozen=True)
class Family:
    name: str  # as the catalog stores it: "sd15"
    label: str  # as people read it: "SD 1.5"
    components: tuple[str, ...]  # the models a full checkpoint holds
    core: str = "unet"  # "unet" (Stable Diffusion) or "transformer" (FLUX)
    config_dir: str | None = None  # shipped configs under merger/configs; None: loading needs configs=
    spellings: tuple[str, ...] = ()  # published names meaning this family, as lower-case letters and digits
    examples: tuple[str, ...] = ()  # how people write it, for help texts (each maps to this family)
    attention_in_first_down_block: bool = False
    attention_in_first_up_block: bool = False

    @property
    def is_sd(self) -> bool:
        """A Stable Diffusion UNet family (LoRAs name UNet blocks and CLIP text encoders)."""
        return self.core == "unet"

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(c for c in self.components if c.startswith("text_encoder"))


SD15 = Family("sd15", "SD 1.5", ("unet", "vae", "text_encoder"), config_dir="sd15",
              examples=("SD 1.5", "SD1.5", "SD 1.4", "SD1", "sd-v1-5", "Stable Diffusion 1.5"),
              attention_in_first_down_block=True)
SDXL = Family("sdxl", "SDXL", ("unet", "vae", "text_encoder", "text_encoder_2"), config_dir="sdxl",
              examples=("SDXL 1.0", "SDXL", "Pony", "Illustrious", "NoobAI"), attention_in_first_up_block=True)
FLUX = Family("flux", "FLUX.1", ("transformer", "vae"), core="transformer", config_dir="flux-dev",
              examples=("Flux.1 D", "Flux.1 S", "black-forest-labs/FLUX.1-dev"))

# Every component name a pipeline of any family may have, and the ones a LoRA adapts.
MODEL_COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")
ADAPTED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")


def _check_family(obj: object) -> Family:
    if not isinstance(obj, Family):
        raise TypeError(f"a diffgraph.families entry point must name a Family, not {type(obj).__name__}")
    unknown = set(obj.components) - set(MODEL_COMPONENTS)
    if unknown:
        raise ValueError(f"family {obj.name!r} names unknown components {sorted(unknown)}")
    return obj


FAMILIES: Registry[Family] = Registry("diffgraph.families", "base-model family", _check_family)
for _family in (SD15, SDXL, FLUX):
    FAMILIES.register(_family.name, _family)


def lookup(name: str) -> Family | None:
    """The registered family called ``name``, or None."""
    return FAMILIES.get(name) if name in FAMILIES else None


def label(name: str) -> str:
    """The readable name of a family ("sd15" -> "SD 1.5"); an unknown name reads as itself."""
    family = lookup(name)
    return family.label if family else name


def sd_families(**facts: bool) -> frozenset[str]:
    """The Stable Diffusion families whose structural facts match ``facts``
    (e.g. ``attention_in_first_down_block=True``)."""
    return frozenset(f.name for f in FAMILIES.values()
                     if f.is_sd and all(getattr(f, k) == v for k, v in facts.items()))


# ---------------------------------------------------------------------------------------------
# published base-model names (Civitai, Hugging Face, A1111, our own) -> family
# ---------------------------------------------------------------------------------------------

UNKNOWN = ("", "unknown", "other", "none")
# SDXL-architecture lines that publishers name instead of SDXL; kept as a sub-label for display
SDXL_VARIANTS = {"pony": "Pony", "illustrious": "Illustrious", "noobai": "NoobAI"}


def family_of(declared: str | None) -> str | None:
    """The architecture family a published base-model name stands for ("SD 1.5" -> "sd15",
    "Pony" -> "sdxl", "black-forest-labs/FLUX.1-dev" -> "flux", "sd_v2" -> "sd2"...), or None
    when the name does not say."""
    if declared is None:
        return None
    s = re.sub(r"[^a-z0-9]+", "", str(declared).lower())
    if s in UNKNOWN:
        return None
    if s in ("sd15", "sdxl", "flux"):
        return s
    for family in FAMILIES.values():  # a registered family's own spellings come before the rules below
        if s == re.sub(r"[^a-z0-9]+", "", family.name) or any(w in s for w in family.spellings):
            return family.name
    if "flux" in s:
        return "flux2" if "flux2" in s else "flux"
    if "xl" in s or any(w in s for w in ("pony", "illustrious", "noobai")):
        return "sdxl"
    if s.startswith("sd3") or "stablediffusion3" in s:
        return "sd3"
    if s.startswith(("sd2", "sdv2")) or "stablediffusion2" in s:
        return "sd2"
    if s.startswith(("sd1", "sdv1", "v1")) or "stablediffusionv1" in s or "stablediffusion1" in s:
        return "sd15"
    return None


def base_family(declared: str | None) -> str:
    """The name the catalog, the vector partitions and every request use for a base: its family
    when the published name says one ("SD 1.5", "SD1.5", "sd-v1-5", "SD 1.4" -> "sd15"; "SDXL 1.0",
    "Pony", "Illustrious" -> "sdxl"), "unknown" when it says nothing, else the name itself
    (stripped), so experts of an architecture DiffGraph does not know stay apart from the rest.
    One vocabulary: experts of one family are found together however their publishers spelled it."""
    text = " ".join(str(declared or "").split())
    if text.lower() in UNKNOWN:
        return "unknown"
    return family_of(text) or text


def variant(declared: str | None) -> str | None:
    """The SDXL line a published name names ("Pony", "Illustrious", "NoobAI"), or None."""
    s = re.sub(r"[^a-z0-9]+", "", str(declared or "").lower())
    return next((shown for key, shown in SDXL_VARIANTS.items() if key in s), None)


def display(family: str, declared: str | None = None) -> str:
    """How a base reads to people: its label, with the published sub-label where one applies
    ("SDXL (Pony)")."""
    sub = variant(declared)
    return f"{label(family)} ({sub})" if sub and family == "sdxl" else label(family)
