"""Which base model a weights file belongs to, from its safetensors header alone.

Only tensor names and shapes (and, to break a tie, the header's free-form metadata) are read,
never the tensors, so a multi-gigabyte checkpoint is identified in milliseconds. The decision
rests on structure rather than sizes, so it holds for the tests' shrunken models too:

- every naming in the wild is brought to one form: a component (UNet-or-transformer, VAE, text
  encoders) and a module path with "_" separators (kohya's lora_unet_down_blocks_0_... and
  diffusers' unet.down_blocks.0... then read alike; LDM's input_blocks.N.M are mapped to
  diffusers block numbers, SD1.5 and SDXL both having two layers per block);
- each observation allows a set of families: FLUX's double/single-stream blocks allow only
  "flux"; attention in the UNet's first down block allows the SD families that have it (SD1.5,
  not SDXL), attention in the first up block those that have it (SDXL, not SD1.5), as each
  family declares (merger/families.py); attention in up blocks 2-3 only SD1.5; transformer
  depth > 1, the added (text-time) embedding or a second text encoder only SDXL; and so on;
- the family is the one every observation allows. Observations that allow none contradict
  each other (an error); several left (a LoRA touching few modules) are settled by the
  header's metadata (kohya's ss_base_model_version, modelspec.architecture, DiffGraph's own
  "diffgraph" entry) or by the cross-attention width of a real model (768 / 2048), or the
  file is reported as undecidable. Families DiffGraph does not handle (SD2, SD3, the SDXL
  refiner) are named in the error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from diffgraph.errors import DiffGraphError
from diffgraph.families import FAMILIES, MODEL_COMPONENTS, UNKNOWN, family_of, label, sd_families
from diffgraph.safetensors_header import InvalidHeader
from diffgraph.safetensors_header import read_header as read_safetensors_header


class BaseDetectionError(DiffGraphError, ValueError):
    """The base model cannot be told (unreadable file, unknown or contradictory layout, a
    family DiffGraph does not handle)."""


class BaseMismatchError(BaseDetectionError):
    """A file is of another base model than the one it was declared or requested as."""


# ---------------------------------------------------------------------------------------------
# reading a header
# ---------------------------------------------------------------------------------------------

def read_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(tensor name -> shape, metadata) of a safetensors file, without reading any tensor."""
    path = Path(path)
    try:
        header = read_safetensors_header(path)
    except OSError as exc:
        raise BaseDetectionError(f"{path.name}: not a readable safetensors file ({exc.strerror or exc})") from None
    except InvalidHeader as exc:
        raise BaseDetectionError(f"{path.name}: not a readable safetensors file ({exc.problem})") from None
    return {k: tuple(v["shape"]) for k, v in header.tensors.items()}, header.metadata


_FOLDER_COMPONENTS = (*MODEL_COMPONENTS, "text_encoder_3")


def _folder_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """A diffusers folder read as one prefixed header (unet/x.safetensors -> "unet.<key>")."""
    shapes: dict[str, tuple[int, ...]] = {}
    for comp in _FOLDER_COMPONENTS:
        for file in sorted((path / comp).glob("*.safetensors")):
            part, _ = read_header(file)
            shapes.update({f"{comp}.{k}": v for k, v in part.items()})
    if not shapes:
        raise BaseDetectionError(f"{path.name}: a folder with no safetensors weights in "
                                 f"{', '.join(_FOLDER_COMPONENTS)}")
    metadata = {}
    if (path / "model_index.json").is_file():
        try:
            metadata["diffusers_pipeline"] = str(json.loads((path / "model_index.json").read_text()).get("_class_name"))
        except (ValueError, AttributeError):
            pass
    return shapes, metadata


def _as_header(source) -> tuple[dict[str, tuple[int, ...]], dict[str, str], str]:
    """(shapes, metadata, display name) from a path, a folder, a validated Header (tensors +
    metadata), a raw header dict ({name: {"shape": ...}, "__metadata__": ...}) or a state dict."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return (*_folder_header(path), path.name)
        if not path.is_file():
            raise BaseDetectionError(f"{path}: no such file")
        return (*read_header(path), path.name)
    if hasattr(source, "tensors") and hasattr(source, "metadata"):
        tensors, metadata = source.tensors, dict(source.metadata or {})
    elif isinstance(source, Mapping):
        tensors = {k: v for k, v in source.items() if k != "__metadata__"}
        metadata = dict(source.get("__metadata__") or {})
    else:
        raise BaseDetectionError(f"cannot read a header from {type(source).__name__}")
    shapes = {}
    for name, info in tensors.items():
        if isinstance(info, Mapping):
            shapes[name] = tuple(info.get("shape") or ())
        elif hasattr(info, "shape"):
            shapes[name] = tuple(info.shape)
        else:
            shapes[name] = tuple(info or ())
    return shapes, metadata, "the weights"


# ---------------------------------------------------------------------------------------------
# names -> observations
# ---------------------------------------------------------------------------------------------

# (prefix, component); longest and most specific first
_PREFIXES = (
    ("model.diffusion_model.", "core"), ("diffusion_model.", "core"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.transformer.", "te_ldm_sd1"), ("cond_stage_model.model.", "te_sd2"),
    ("conditioner.embedders.0.transformer.", "te_ldm_sdxl"), ("conditioner.embedders.1.model.", "te2"),
    ("conditioner.embedders.0.model.", "te_refiner"),
    ("text_encoders.clip_l.", "te_any"), ("text_encoders.t5xxl.", "t5"), ("text_encoders.clip_g.", "te_sd3"),
    ("lora_unet_", "core"), ("lora_transformer_", "core"),
    ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "t5"), ("lora_te_", "te_kohya"),
    ("unet.", "core"), ("transformer.", "core"),
    ("text_encoder_2.", "te2"), ("text_encoder_3.", "t5"), ("text_encoder.", "te_any"),
    ("vae.", "vae"),
)
_CORE_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
               "add_embedding", "input_blocks", "output_blocks", "middle_block", "time_embed", "label_emb",
               "double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
               "final_layer", "transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
               "time_text_embed", "joint_blocks", "pos_embed")
_TE_ROOTS = ("text_model", "encoder_layers", "embeddings", "final_layer_norm", "text_projection")
_VAE_ROOTS = ("encoder_down", "encoder_mid", "encoder_conv", "encoder_norm_out", "decoder_", "quant_conv",
              "post_quant_conv")

_BFL = ("double_blocks_", "single_blocks_", "img_in_", "txt_in_", "time_in_", "vector_in_", "guidance_in_",
        "final_layer_")
_FLUX_DIFFUSERS = ("single_transformer_blocks_", "x_embedder_", "time_text_embed_guidance_embedder_")
_SD3 = ("joint_blocks_", "pos_embed_")
_SD_BLOCK = re.compile(r"(down|up)_blocks_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)_")
_LDM_BLOCK = re.compile(r"(input|output)_blocks_(\d+)_(\d+)_(.*)")
_SD_DEPTH = re.compile(r"_transformer_blocks_(\d+)_")
_JOINT = re.compile(r"transformer_blocks_(\d+)_")
_TE_LAYER = re.compile(r"(?:^|_)(?:layers|resblocks)_(\d+)_")
_CROSS_K = re.compile(r"attn2_to_k_(?:weight|lora_down_weight|lora_A_weight|lora_A_default_weight)$")
REAL_CONTEXT_WIDTH = {768: "sd15", 2048: "sdxl"}  # SD2's 1024 is refused by name


def _locate(key: str) -> tuple[str, str]:
    """(component, module path with "_" separators) of one tensor name."""
    comp = None
    rest = key.removeprefix("base_model.model.")  # PEFT-native: the adapted model's own names follow
    for prefix, c in _PREFIXES:
        if rest.startswith(prefix):
            comp, rest = c, rest[len(prefix):]
            break
    flat = rest.replace(".", "_")
    if comp == "te2" and flat.startswith(("encoder_block_", "shared_", "encoder_final_layer_norm")):
        comp = "t5"  # FLUX's text_encoder_2 is T5, not OpenCLIP
    if comp is None:
        if flat.startswith(_CORE_ROOTS):
            comp = "core"
        elif flat.startswith(_VAE_ROOTS):
            comp = "vae"
        elif flat.startswith(_TE_ROOTS):
            comp = "te_any"
        else:
            comp = "other"
    return comp, flat


@dataclass
class Observations:
    components: set[str] = field(default_factory=set)
    bfl: bool = False
    flux_diffusers: bool = False
    joint_depth: int = -1  # deepest top-level transformer_blocks index (FLUX double / SD3 joint)
    sd3: bool = False
    sd_unet: bool = False
    ldm_unet: bool = False
    added_embedding: bool = False
    depth: int = -1  # deepest transformer_blocks index inside an SD UNet attention
    blocks: set[tuple[str, int]] = field(default_factory=set)  # ("down"|"up", block)
    attentions: set[tuple[str, int]] = field(default_factory=set)
    up_attention_slots: int = -1
    te_layers: dict[str, int] = field(default_factory=dict)
    vae_latent: int | None = None
    context_width: int | None = None


def observe(shapes: Mapping[str, tuple[int, ...]]) -> Observations:
    ob = Observations()
    for key, shape in shapes.items():
        comp, flat = _locate(key)
        ob.components.add(comp)
        if comp == "core":
            _observe_core(ob, flat, shape)
        elif comp.startswith("te") or comp == "t5":
            if m := _TE_LAYER.search(flat):
                ob.te_layers[comp] = max(ob.te_layers.get(comp, -1), int(m.group(1)))
        elif comp == "vae" and flat.endswith("encoder_conv_out_weight") and len(shape) == 4:
            ob.vae_latent = shape[0] // 2
    return ob


def _observe_core(ob: Observations, flat: str, shape: tuple[int, ...]) -> None:
    if flat.startswith(_BFL):
        ob.bfl = True
    elif flat.startswith(_FLUX_DIFFUSERS):
        ob.flux_diffusers = True
    elif flat.startswith(_SD3):
        ob.sd3 = True
    elif m := _SD_BLOCK.match(flat):
        side, block, kind, slot = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        ob.sd_unet = True
        ob.blocks.add((side, block))
        if kind == "attentions":
            ob.attentions.add((side, block))
            if side == "up":
                ob.up_attention_slots = max(ob.up_attention_slots, slot)
            if d := _SD_DEPTH.search(flat):
                ob.depth = max(ob.depth, int(d.group(1)))
    elif m := _LDM_BLOCK.match(flat):
        # LDM numbering, two layers per block (SD1.5 and SDXL): input_blocks.N (N >= 1) is down
        # block (N-1)//3, output_blocks.N is up block N//3; slot 1 is the attention (or, in an
        # up block without attention, the upsampler's conv)
        side, n, slot, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        ob.sd_unet = ob.ldm_unet = True
        if side == "input" and n >= 1:
            ob.blocks.add(("down", (n - 1) // 3))
            if slot == 1:
                ob.attentions.add(("down", (n - 1) // 3))
        elif side == "output":
            ob.blocks.add(("up", n // 3))
            if slot == 1 and not rest.startswith("conv_"):
                ob.attentions.add(("up", n // 3))
                ob.up_attention_slots = max(ob.up_attention_slots, n % 3)
        if d := _SD_DEPTH.search("_" + rest):
            ob.depth = max(ob.depth, int(d.group(1)))
    elif flat.startswith(("add_embedding_", "label_emb_")):
        ob.sd_unet = ob.added_embedding = True
    elif flat.startswith(("mid_block_", "middle_block_", "time_embedding_", "time_embed_", "conv_in_")):
        ob.sd_unet = True
    elif m := _JOINT.match(flat):
        ob.joint_depth = max(ob.joint_depth, int(m.group(1)))
    if _CROSS_K.search(flat) and len(shape) == 2:
        ob.context_width = shape[1]


def _constraints(ob: Observations, name: str) -> list[tuple[frozenset, str]]:
    """What each observation allows, as (families, reason); raises for families we refuse."""
    if ob.sd3 or "te_sd3" in ob.components or ob.joint_depth > 18:
        raise BaseDetectionError(f"{name}: a Stable Diffusion 3 model (joint transformer blocks); not supported")
    if "te_sd2" in ob.components or ob.te_layers.get("te_any", -1) in (22, 23):
        raise BaseDetectionError(f"{name}: a Stable Diffusion 2.x model (OpenCLIP-H text encoder); not supported")
    if "te_refiner" in ob.components and "te_ldm_sdxl" not in ob.components:
        raise BaseDetectionError(f"{name}: an SDXL refiner (one OpenCLIP text encoder); not supported")
    c: list[tuple[frozenset, str]] = []
    add = lambda fams, why: c.append((frozenset(fams), why))
    if ob.bfl or ob.flux_diffusers:
        add({"flux"}, "FLUX double/single-stream blocks")
    elif ob.joint_depth >= 0:
        add({"flux"}, "joint-attention transformer blocks")
    if "t5" in ob.components:
        add({"flux"}, "a T5 text encoder")
    if ob.sd_unet:
        add(sd_families(), "a Stable Diffusion UNet")
    if ob.ldm_unet:
        add({"sd15", "sdxl"}, "LDM-numbered UNet blocks")
    if "te2" in ob.components:
        add({"sdxl"}, "a second (OpenCLIP bigG) text encoder")
    if "te_ldm_sdxl" in ob.components:
        add({"sdxl"}, "SGM conditioner embedders")
    if "te_ldm_sd1" in ob.components:
        add({"sd15"}, "an LDM cond_stage_model CLIP")
    if "te1" in ob.components:
        add({"sdxl", "flux"}, "kohya lora_te1_ (first of two text encoders)")
    if "te_kohya" in ob.components:
        add({f.name for f in FAMILIES.values() if f.is_sd and len(f.text_encoders) == 1},
            "kohya lora_te_ (a single text encoder)")
    if ob.added_embedding:
        add({"sdxl"}, "the added text-time embedding")
    if ob.depth >= 1:
        add({"sdxl"}, f"{ob.depth + 1} transformer layers in a UNet attention")
    if ("down", 0) in ob.attentions:
        add(sd_families(attention_in_first_down_block=True), "attention in the first down block")
    if ("up", 0) in ob.attentions:
        add(sd_families(attention_in_first_up_block=True), "attention in the first up block")
    if ob.attentions & {("up", 2), ("up", 3)}:
        add({"sd15"}, "attention in up blocks 2-3")
    blocks = [b for _, b in ob.blocks]
    if blocks and max(blocks) >= 3:
        add({"sd15"}, "four UNet resolution levels")
    elif blocks and max(blocks) == 2:
        add({"sd15", "sdxl"}, "three or more UNet resolution levels")
    if ob.up_attention_slots >= 2:
        add({"sd15", "sdxl"}, "three attentions per up block")
    if ob.vae_latent in (4, 16):
        add(sd_families() if ob.vae_latent == 4 else {"flux"}, f"a {ob.vae_latent}-channel VAE latent")
    return c


def _metadata_hint(metadata: Mapping[str, str]) -> str | None:
    hints = []
    own = metadata.get("diffgraph")
    if own:
        try:
            hints.append(json.loads(own).get("base_model"))
        except (ValueError, AttributeError):
            pass
    hints += [metadata.get("ss_base_model_version"), metadata.get("modelspec.architecture"),
              metadata.get("diffusers_pipeline")]
    for hint in hints:
        fam = family_of(str(hint)) if hint else None
        if fam in FAMILIES:
            return fam
    return None


@dataclass(frozen=True)
class Detection:
    family: str
    reasons: tuple[str, ...]  # the observations that decided it


def explain_base(header_or_path) -> Detection:
    """The family and the observations behind it (see :func:`detect_base`)."""
    shapes, metadata, name = _as_header(header_or_path)
    if not shapes:
        raise BaseDetectionError(f"{name}: holds no tensors")
    ob = observe(shapes)
    constraints = _constraints(ob, name)
    if not constraints:
        raise BaseDetectionError(f"{name}: no tensor names of a known text-to-image model "
                                 f"(e.g. {', '.join(sorted(shapes)[:2])})")
    every = set(FAMILIES.names())
    allowed = set(every)
    for fams, why in constraints:
        if not allowed & fams:
            seen = "; ".join(f"{w} ({'/'.join(sorted(f))})" for f, w in constraints)
            raise BaseDetectionError(f"{name}: contradictory layout: {seen}")
        allowed &= fams
    reasons = tuple(w for f, w in constraints if len(f) < len(every))
    if len(allowed) == 1:
        return Detection(allowed.pop(), reasons)
    hint = _metadata_hint(metadata)
    if hint in allowed:
        return Detection(hint, (*reasons, "the file's metadata"))
    width = REAL_CONTEXT_WIDTH.get(ob.context_width)
    if width in allowed:
        return Detection(width, (*reasons, f"cross-attention width {ob.context_width}"))
    raise BaseDetectionError(f"{name}: cannot tell {' from '.join(label(f) for f in sorted(allowed))} "
                             f"by its tensor names (it only shows {'; '.join(w for _, w in constraints)})")


def detect_base(header_or_path) -> str:
    """The family ("sd15", "sdxl", "flux" or a registered one) of a weights file (full
    checkpoint, LoRA, a single component) given as a path, a diffusers folder, a validated safetensors Header, a
    raw header dict or a state dict; BaseDetectionError (one line) when it cannot be told."""
    return explain_base(header_or_path).family


def reconcile_base(declared: str, files) -> str:
    """The base model to record for an expert whose weights are ``files`` (a list of paths or
    headers, or {published name: path or header}): ``declared`` when the files agree with it
    or cannot be told, the detected family when ``declared`` is unknown, and
    BaseMismatchError (one line) when a file clearly belongs to another family."""
    want = family_of(declared)
    if not isinstance(files, Mapping):
        files = files if isinstance(files, (list, tuple)) else [files]
        files = {Path(f).name if isinstance(f, (str, Path)) else f"file {i + 1}": f for i, f in enumerate(files)}
    found: dict[str, str] = {}
    for name, f in files.items():
        try:
            found[name] = detect_base(f)
        except BaseDetectionError:
            continue  # undecidable files neither confirm nor contradict
    if want is not None:
        wrong = {n: fam for n, fam in found.items() if fam != want}
        if wrong:
            n, fam = next(iter(wrong.items()))
            raise BaseMismatchError(f"declared base model {declared!r} but {n} holds {label(fam)} weights")
        return declared
    families = set(found.values())
    if str(declared or "").strip().lower() in UNKNOWN and len(families) == 1:
        return families.pop()
    return declared
