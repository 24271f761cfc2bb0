"""MergeEngine: recipe in, merged weights and image out, with the expensive parts cached.

Checkpoints are merged by the streaming engine (``merger/stream.py``), the same loop that
writes full-size merges to disk, so there is one checkpoint sum to trust. Merged bases are
cached by the checkpoint part of the recipe and LoRA deltas by file, both in LRU caches bounded
by bytes, so refining a prompt or changing only LoRA weights never re-merges checkpoints, and a
server under load keeps its memory bounded.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from diffgraph.families import MODEL_COMPONENTS
from diffgraph.safetensors_header import read_header

from .detect import detect_base
from .ldm_keys import ldm_to_diffusers
from .merge import MergeError, add_deltas, lora_deltas
from .real_pipelines import read_tensors
from .recipe import BASE, MergeRecipe
from .render import render
from .stream import MemorySource, StreamMerge

SCHEDULERS = ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "DDIMScheduler", "PNDMScheduler", "UniPCMultistepScheduler")


class ByteLRU:
    """An LRU of tensor dicts whose total size stays under ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[dict, int]] = OrderedDict()
        self.evictions = 0

    @staticmethod
    def _size(value: dict) -> int:
        return sum(t.numel() * t.element_size() for t in value.values())

    def get(self, key: str):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        return None

    def put(self, key: str, value: dict) -> None:
        self._items[key] = (value, self._size(value))
        self._items.move_to_end(key)
        self._evict()

    def resize(self, max_bytes: int) -> None:
        """A new bound, applied at once (least recently used entries go first)."""
        self.max_bytes = max_bytes
        self._evict()

    def _evict(self) -> None:
        while len(self._items) > 1 and self.total_bytes > self.max_bytes:
            self._items.popitem(last=False)
            self.evictions += 1

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def __len__(self) -> int:
        return len(self._items)


def components(pipe) -> list[str]:
    """The weight-carrying models this pipeline has (SD: unet, vae, text_encoder; SDXL adds
    text_encoder_2; FLUX has a transformer)."""
    return [c for c in MODEL_COMPONENTS if getattr(pipe, c, None) is not None]


def pipeline_state(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights as one flat dict with component prefixes ("unet.<param>")."""
    # merging happens on the CPU (in fp32); load_state_dict copies the result to the device
    return {f"{c}.{k}": v.detach().to("cpu", copy=True) for c in components(pipe) for k, v in getattr(pipe, c).state_dict().items()}


def _difference(shapes: dict[str, tuple], expected: dict[str, tuple]) -> str:
    """What sets two tensor layouts apart, in a few words (for a one-line MergeError)."""
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        return f"{len(missing)} missing, {len(extra)} extra, e.g. {(missing or extra)[0]}"
    key = next(k for k in expected if shapes[k] != expected[k])
    return f"{key} has shape {list(shapes[key])}, the base model has {list(expected[key])}"


def load_state(pipe, state: dict[str, torch.Tensor]) -> None:
    for c in components(pipe):
        prefix = c + "."
        getattr(pipe, c).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)


class MergeEngine:
    """Merges and renders recipes on one base architecture (one device, one render at a time)."""

    def __init__(self, pipe, cache_bytes: int = 256 << 20):
        self.pipe = pipe
        self.base_state = pipeline_state(pipe)
        self._shapes = {k: tuple(v.shape) for k, v in self.base_state.items()}
        self._scratch = None  # a copy of the pipeline where LoRA files are loaded to read their deltas
        self.bases = ByteLRU(cache_bytes)
        self.deltas = ByteLRU(cache_bytes // 2)
        self.lock = threading.Lock()  # renders queue on the one device
        self._loaded_key: str | None = None

    @classmethod
    def from_pretrained(cls, base_dir: Path, device: str = "cpu", **kw) -> "MergeEngine":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), **kw)

    def merged_base(self, recipe: MergeRecipe) -> dict[str, torch.Tensor]:
        """sum_i softmax(w_ckpt)_i W_i (the base itself when the recipe names no checkpoint).

        Floating-point tensors come out fp32 whatever the files hold (the pipeline renders in
        fp32, and the cache accounts for fp32 bytes), always in fresh tensors, never the base's
        or a cached entry's, so nothing cached or shared can be changed through the result.
        Every input is checked against the base's names and shapes before a tensor is read."""
        if not recipe.checkpoints:
            return self.base_state
        key = recipe.checkpoint_key()
        cached = self.bases.get(key)
        if cached is None:
            inputs = [(MemorySource(self.base_state, "the base model") if c.name == BASE
                       else self._checkpoint(Path(c.path)), w) for c, w in recipe.checkpoint_weights()]
            with StreamMerge(inputs, dtype=torch.float32) as merge:
                # the plan has checked every input against the first; the first must be the base's shape
                planned = {job.key: job.shape for job in merge.jobs}
                if planned != self._shapes:
                    raise MergeError(f"{merge.ckpts[0][0].name}: its tensors do not match the base model's "
                                     f"architecture ({_difference(planned, self._shapes)})")
                cached = merge.to_dict()
            self.bases.put(key, cached)
        return cached

    def _checkpoint(self, path: Path) -> Path | MemorySource:
        """A checkpoint expert under the pipeline's names: the file itself when it already uses
        them (the mini world's files; streamed), else its original single-file layout (LDM/SGM,
        as Civitai and A1111 ship SD1.5 and SDXL) converted with this pipeline's configs. A
        converted file is held in memory while it is merged, under its file name so that a
        mismatch names it."""
        if set(read_header(path).tensors) == set(self.base_state):
            return path
        try:
            parts = ldm_to_diffusers(read_tensors(path), detect_base(path), self._configs())
        except ValueError as exc:  # undetectable, another family, or tensors no rule accounts for
            raise MergeError(f"{path.name}: its tensors do not match the base model's architecture ({exc})") from None
        return MemorySource({f"{c}.{k}": v for c, state in parts.items() for k, v in state.items()}, path.name)

    def _configs(self) -> dict[str, dict]:
        """The pipeline's component configs, as the LDM converters take them."""
        out = {}
        for c in components(self.pipe):
            config = getattr(self.pipe, c).config
            out[c] = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        return out

    def lora_delta(self, path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
        key = sha256 or str(Path(path).resolve())
        cached = self.deltas.get(key)
        if cached is None:
            if self._scratch is None:
                self._scratch = copy.deepcopy(self.pipe)
            cached = lora_deltas(self._scratch, Path(path))
            self.deltas.put(key, cached)
        return cached

    def weights(self, recipe: MergeRecipe) -> dict[str, torch.Tensor]:
        base = self.merged_base(recipe)
        # A LoRA entry named BASE is an anchor: it takes a share of the softmax and adds no delta,
        # so a lone LoRA can be used at less than full strength ("less of this expert").
        return add_deltas(base, [(self.lora_delta(Path(e.path), e.sha256), w) for e, w in recipe.lora_weights()
                                 if e.name != BASE])

    @property
    def native_size(self) -> tuple[int, int]:
        """(width, height) the base was trained at: its UNet's sample size in pixels (512 for
        SD 1.5, 1024 for SDXL)."""
        side = int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        return side, side

    def fit_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """The size to render for a requested one: the native size when none is asked for, else
        the request with its aspect kept, scaled into half to twice the native area's sides and
        rounded to the VAE's multiple (a UNet renders garbage far outside what it was trained on)."""
        native_w, native_h = self.native_size
        if not width and not height:
            return native_w, native_h
        width, height = width or height, height or width
        low, high = native_w // 2, native_w * 2
        scale = min(1.0, high / max(width, height)) if max(width, height) > high else max(1.0, low / min(width, height))
        step = int(self.pipe.vae_scale_factor) * 2
        return tuple(max(step, int(round(v * scale / step)) * step) for v in (width, height))

    def sized(self, recipe: MergeRecipe) -> MergeRecipe:
        """The recipe with the size it renders at written in (see :meth:`fit_size`)."""
        width, height = self.fit_size(recipe.width, recipe.height)
        return recipe if (recipe.width, recipe.height) == (width, height) else replace(recipe, width=width, height=height)

    def render(self, recipe: MergeRecipe) -> Image.Image:
        """Merge (cached) and render one image at the recipe's size (see :meth:`sized`);
        deterministic for a recipe on one machine."""
        recipe = self.sized(recipe)
        with self.lock:
            weights = self.weights(recipe)
            key = recipe.checkpoint_key() + repr([(e.name, e.sha256, w) for e, w in recipe.lora_weights()])
            if key != self._loaded_key:
                load_state(self.pipe, weights)
                self._loaded_key = key
            self._use_scheduler(recipe.scheduler)
            return render(self.pipe, [recipe.prompt], [recipe.seed], steps=recipe.steps, guidance=recipe.guidance,
                          negative_prompt=recipe.negative_prompt, width=recipe.width, height=recipe.height)[0]

    def _use_scheduler(self, name: str) -> None:
        if type(self.pipe.scheduler).__name__ == name:
            return
        if name not in SCHEDULERS:
            raise MergeError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
        import diffusers

        self.pipe.scheduler = getattr(diffusers, name).from_config(self.pipe.scheduler.config)
