"""Base-model families: the architectures DiffGraph merges and renders, declared once.

A family names the model components of its pipeline (diffusers names), its core model (a UNet
for Stable Diffusion, a transformer for FLUX), the configs shipped for loading its single
files offline, how publishers spell it, and the two structural facts base detection
(merger/detect.py) needs to tell Stable Diffusion UNets apart: whether the first down block and
the first up block have attention. Built in: SD 1.5, SDXL and FLUX.1. Other packages add a
family through the ``diffgraph.families`` entry-point group, as the mini world adds its tiny SD.
"""

from __future__ import annotations

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
              attention_in_first_down_block=True)
SDXL = Family("sdxl", "SDXL", ("unet", "vae", "text_encoder", "text_encoder_2"), config_dir="sdxl",
              attention_in_first_up_block=True)
FLUX = Family("flux", "FLUX.1", ("transformer", "vae"), core="transformer", config_dir="flux-dev")

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
