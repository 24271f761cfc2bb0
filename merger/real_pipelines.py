"""Real base models, loaded offline: SD1.5 / SDXL single files, diffusers folders, FLUX.1.

Nothing here reaches a hub. A single-file checkpoint carries weights only, so the model
configs come with the package (``merger/configs/<family>/``: the published configs of
stable-diffusion-v1-5, stable-diffusion-xl-base-1.0 and FLUX.1-dev), and the CLIP tokenizers
are built from the BPE table that ships in open_clip_torch (diffgraph.clip_bpe). Callers may
pass other configs (``configs=``: {component: config dict} or a diffusers folder), which is how
the tests load shrunken models with the real layouts.

Loading is strict: the file's base model is detected from its header first (a file of another
family is refused with a one-line reason), every tensor is converted by
:mod:`diffgraph.merger.ldm_keys` (which refuses tensors it cannot account for), shapes are
checked against the config, and ``load_state_dict(strict=True)`` must then succeed, so a model
is never half loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from diffgraph.clip_bpe import clip_vocab_and_merges
from diffgraph.families import FAMILIES, MODEL_COMPONENTS, label, lookup

from .detect import BaseDetectionError, BaseMismatchError, detect_base
from .ldm_keys import COMPONENTS, ldm_to_diffusers

CONFIG_ROOT = Path(__file__).parent / "configs"
_CONFIG_FILES = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json",
                 "tokenizer_2": "tokenizer_config.json"}
_DIFFUSERS_PREFIXES = tuple(c + "." for c in MODEL_COMPONENTS)


class BaseLoadError(BaseDetectionError):
    """A base model that cannot be loaded as asked (one line)."""


def shipped_configs(family: str) -> dict[str, dict]:
    """{component: config dict} of the real model of ``family``, as shipped in the package."""
    config_dir = _config_dir(family)
    if config_dir is None:
        shipped = [f.name for f in FAMILIES.values() if f.config_dir]
        raise BaseLoadError(f"no shipped configs for {family!r} (shipped: {', '.join(shipped)})")
    return _read_config_folder(CONFIG_ROOT / config_dir)


def _config_dir(family: str) -> str | None:
    found = lookup(family)
    return found.config_dir if found else None


def _read_config_folder(root: Path) -> dict[str, dict]:
    configs = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        file = sub / _CONFIG_FILES.get(sub.name, "config.json")
        if file.is_file():
            configs[sub.name] = json.loads(file.read_text())
    if (root / "model_index.json").is_file():
        configs["model_index"] = json.loads((root / "model_index.json").read_text())
    return configs


def resolve_configs(family: str, configs: Mapping | str | Path | None = None) -> dict[str, dict]:
    """The shipped configs of ``family`` with the components ``configs`` gives replaced
    (a dict {component: config}, or a diffusers folder whose configs are read)."""
    base = shipped_configs(family) if _config_dir(family) else {}
    if configs is None:
        if not base:
            raise BaseLoadError(f"no shipped configs for {family!r}: pass configs= (a dict or a diffusers folder)")
        return base
    given = _read_config_folder(Path(configs)) if isinstance(configs, (str, Path)) else dict(configs)
    return {**base, **{k: dict(v) for k, v in given.items()}}


# ---------------------------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------------------------

def build_clip_tokenizer(config: Mapping | None = None):
    """CLIP's tokenizer, built offline from the BPE table in open_clip_torch. ``config`` is a
    tokenizer_config.json dict (SDXL's second tokenizer pads with "!", the first with
    <|endoftext|>)."""
    from transformers import CLIPTokenizer

    config = dict(config or {})
    try:
        vocab, merges = clip_vocab_and_merges()
    except RuntimeError as exc:
        raise BaseLoadError(str(exc)) from None
    # transformers 5 takes vocab= and merges= (vocab_file= would be ignored silently)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges),
                         model_max_length=int(config.get("model_max_length", 77)),
                         pad_token=config.get("pad_token", "<|endoftext|>"))


def _model_class(component: str):
    if component == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel
    if component == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL
    if component == "transformer":
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel


def _empty_model(component: str, config: Mapping):
    """The component with its parameters not yet allocated (meta), buffers real."""
    cls = _model_class(component)
    try:
        from accelerate import init_empty_weights
    except ImportError:  # plain init: slower and twice the memory, same result
        from contextlib import nullcontext as init_empty_weights
    with init_empty_weights():
        if component.startswith("text_encoder"):
            from transformers import CLIPTextConfig

            return cls(CLIPTextConfig.from_dict(dict(config)))
        return cls.from_config(dict(config))


def build_component(component: str, config: Mapping, state: Mapping[str, torch.Tensor], *,
                    dtype: torch.dtype | None = torch.float32, source: str = "the file"):
    """A model of ``config`` holding exactly ``state`` (every parameter, nothing extra, same
    shapes); BaseLoadError naming the first differences otherwise."""
    model = _empty_model(component, config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k} is {list(state[k].shape)} in the file "
                         f"but {list(expected[k].shape)} in the config")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise BaseLoadError(f"{source}: its {component} does not fit the config: {'; '.join(parts)}")

    def cast(t: torch.Tensor) -> torch.Tensor:  # per tensor: diffusers warns on module.to(dtype)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    model.load_state_dict({k: cast(v) for k, v in state.items()}, strict=True, assign=True)
    for module in model.modules():  # non-persistent buffers (in no file) follow the dtype too
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = cast(buf)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# single files
# ---------------------------------------------------------------------------------------------

def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each copied into memory torch allocated.

    safetensors hands out views of one mapping of the whole file, at the file's own byte
    offsets (8-byte aligned). Two rules make a loaded base copy them, one tensor at a time so
    the peak stays near the file's size: it must compute exactly what the same weights compute
    in a model built in memory (torch's CPU kernels take another path, with other last bits, for
    weights that are not 16-byte aligned: measured by benchmarks/alignment.py), so that a recipe
    replays bit for bit however its base was loaded; and it must not hold a mapping of the
    user's file, which a re-download or an edit in place would turn into a crash (SIGBUS)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key).clone() for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise BaseLoadError(f"{path.name}: not a readable safetensors file ({exc})") from None


_ORIGINAL_ROOTS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.",
                   "double_blocks.", "single_blocks.", "img_in.")


def _layout(keys) -> str:
    """"original" (LDM / SGM / BFL names), "diffusers" (component prefixes, as the mini world
    writes single files) or "bare" (one diffusers component's own keys)."""
    keys = list(keys)
    if any(k.startswith(_ORIGINAL_ROOTS) for k in keys):
        return "original"
    if any(k.startswith(_DIFFUSERS_PREFIXES) for k in keys):
        return "diffusers"
    return "bare"


def split_state(tensors: Mapping[str, torch.Tensor], family: str,
                configs: Mapping[str, Mapping]) -> dict[str, dict[str, torch.Tensor]]:
    """A single file's tensors as {component: diffusers state}, whatever its naming."""
    layout = _layout(tensors)
    if layout == "original":
        if family not in COMPONENTS:
            raise BaseLoadError(f"{label(family)} files are not in an original (LDM/BFL) layout")
        return ldm_to_diffusers(tensors, family, configs)
    if layout == "diffusers":
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            comp = next((c for c in sorted(MODEL_COMPONENTS, key=len, reverse=True) if key.startswith(c + ".")), None)
            if comp is None:
                raise BaseLoadError(f"unexpected tensor {key!r} beside component-prefixed ones")
            parts.setdefault(comp, {})[key[len(comp) + 1:]] = value
        return parts
    found = lookup(family)
    return {found.core if found else "unet": dict(tensors)}


def _check_family(path: Path, family: str | None) -> str:
    detected = detect_base(path)
    if family is not None and family != detected:
        raise BaseMismatchError(f"{path.name} holds {label(detected)} weights, "
                                f"not {label(family)}; refusing to load it as {family}")
    return detected


def load_components(path: str | Path, family: str | None = None, *, configs=None,
                    dtype: torch.dtype | None = torch.float32,
                    components: tuple[str, ...] | None = None) -> dict[str, torch.nn.Module]:
    """The models a single file holds ({"unet", "vae", "text_encoder", ...} or {"transformer"}),
    loaded with the shipped configs of its family (or ``configs``). ``family`` is checked
    against what the header shows; ``components`` limits what is built."""
    path = Path(path)
    family = _check_family(path, family)
    cfgs = resolve_configs(family, configs)
    if family == "flux" and "transformer" not in cfgs:
        raise BaseLoadError("no transformer config for FLUX")
    parts = split_state(read_tensors(path), family, cfgs)
    if family == "flux" and "transformer" in parts and configs is None:
        # FLUX.1 [schnell] has no guidance embedder; the tensors say which model this is
        has_guidance = any(k.startswith("time_text_embed.guidance_embedder.") for k in parts["transformer"])
        cfgs["transformer"] = {**cfgs["transformer"], "guidance_embeds": has_guidance}
    wanted = [c for c in parts if components is None or c in components]
    out = {}
    for comp in wanted:
        if comp not in cfgs:
            raise BaseLoadError(f"{path.name}: no config for its {comp}")
        try:
            out[comp] = build_component(comp, cfgs[comp], parts[comp], dtype=dtype, source=path.name)
        except BaseLoadError as exc:
            if configs is not None:
                raise
            # the shipped configs are the real model's: a file of other sizes is not loadable from them
            raise BaseLoadError(f"{exc} (the shipped {label(family)} configs describe the released model; for a "
                                "model of other sizes use its diffusers folder, which carries its configs)") from None
    return out


def _scheduler(config: Mapping):
    import diffusers

    cfg = dict(config)
    cls = getattr(diffusers, cfg.pop("_class_name", "PNDMScheduler"))
    return cls.from_config(cfg)


def load_single_file(path: str | Path, family: str | None = None, *, dtype: torch.dtype = torch.float32,
                     configs=None, device: str | torch.device = "cpu"):
    """A base model from one .safetensors file, offline.

    SD1.5 (and other one-text-encoder SD families) -> StableDiffusionPipeline; SDXL ->
    StableDiffusionXLPipeline; FLUX.1 -> the FluxTransformer2DModel alone (its T5 text encoder
    never comes in such a file). ``family`` (if given) must match the file; ``configs``
    replaces shipped component configs ({component: config} or a diffusers folder)."""
    path = Path(path)
    family = _check_family(path, family)
    if family == "flux":
        return load_components(path, "flux", configs=configs, dtype=dtype, components=("transformer",))[
            "transformer"].to(device)
    parts = load_components(path, family, configs=configs, dtype=dtype)
    cfgs = resolve_configs(family, configs)
    absent = [c for c in FAMILIES.get(family).components if c not in parts]
    if absent:
        raise BaseLoadError(f"{path.name}: holds no {', '.join(absent)}; a full {label(family)} checkpoint is needed")
    scheduler = _scheduler(cfgs.get("scheduler") or shipped_configs("sd15")["scheduler"])
    if "text_encoder_2" in FAMILIES.get(family).components:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"],
            tokenizer=build_clip_tokenizer(cfgs.get("tokenizer")),
            tokenizer_2=build_clip_tokenizer(cfgs.get("tokenizer_2")), unet=parts["unet"], scheduler=scheduler)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=build_clip_tokenizer(cfgs.get("tokenizer")),
            unet=parts["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_flux_transformer(path: str | Path, *, dtype: torch.dtype = torch.float32, config: Mapping | None = None):
    """A FLUX.1 transformer from a BFL-named (flux1-dev.safetensors) or diffusers-named file."""
    return load_single_file(path, "flux", dtype=dtype, configs=None if config is None else {"transformer": config})


def load_pretrained(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A diffusers folder (model_index.json + component folders), from local files only."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise BaseLoadError(f"{folder}: not a diffusers folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_base(path: str | Path, family: str | None = None, **kwargs):
    """A diffusers folder or a single file, whichever ``path`` is."""
    path = Path(path)
    if path.is_dir():
        if family is not None:
            _check_family(path, family)
        return load_pretrained(path, **{k: v for k, v in kwargs.items() if k in ("dtype", "device")})
    return load_single_file(path, family, **kwargs)


__all__ = ["BaseLoadError", "build_clip_tokenizer", "build_component", "load_base", "load_components",
           "load_flux_transformer", "load_pretrained", "load_single_file", "read_tensors", "resolve_configs",
           "shipped_configs", "split_state"]
