"""The merge at full size: K checkpoints and N LoRAs summed tensor by tensor from safetensors.

    W[key] = sum_i w_i C_i[key]  +  sum_j c_j (alpha_j / rank_j) up_j @ down_j      (fp32)

is computed one tensor at a time, in file order, and either kept (a dict of tensors, for
rendering) or written incrementally into a single ``.safetensors`` file whose header (names,
shapes, offsets, and the recipe in ``__metadata__``) is known before the first byte of data,
so the whole result never sits in memory. Peak memory is the result (when kept) plus a
bounded prefetch window, never K models.

How the bytes move (measured with benchmarks/merge/, figures in benchmarks/RESULTS.md):

- **Threads.** A small pool (``threads``, default 2) processes whole tensors: read every
  input's copy of one tensor, sum it, hand it on; at most ``prefetch_bytes`` of inputs are in
  flight, and results reach the dict or the writer in file order. Reads and torch ops release
  the GIL, so the workers overlap on separate cores.
- **Reads.** Every input file's header is checked by
  :func:`diffgraph.safetensors_header.read_header` (offsets tile the data
  section), then tensors are read straight from their byte ranges. Large tensors are mapped
  (``mmap``, one mapping per tensor, dropped after use, so the resident set stays bounded) and
  pre-faulted with ``madvise`` WILLNEED + POPULATE_READ (through ctypes, which releases the
  GIL); the sum then reads the page cache with no copy. That is for bytes already in the page
  cache (``mincore``): bytes still on disk are read with ``os.preadv`` into reused buffers
  (GIL-free), whose large sequential reads ran twice as fast from a cold disk as faulting the
  mapping in. ``read_mode`` "auto" (default) decides per tensor; "mmap" and "pread" force one. ``safe_open().get_tensor`` is not used: in
  safetensors 0.8 it returns views of one mapping of the whole file (nothing is read until
  touched, then every touched page stays resident until the file is closed), and touching them
  from two threads was no faster than from one.
- **Sums** run in cache-sized chunks (``chunk_elems``): each chunk of each input is widened to
  fp32 in a scratch buffer and accumulated with ``add_(x, alpha=w)``, and the result chunk is
  rounded once into the output dtype (by default the first checkpoint's dtype of that tensor).
  The result is bit for bit that of the obvious whole-tensor fp32 code. torch's mixed-dtype
  ``add_(fp16)`` is several times slower than widening first.
- **LoRA deltas** are added to their base tensor as it streams by: the N LoRAs of a module
  are concatenated along the rank, B = [c_1 up_1 | ... | c_N up_N] and A = [down_1; ...; down_N],
  and each row block of the accumulator gets one fused ``addmm_(B[rows], A)`` in fp32
  (``lora_matmul="bf16"`` trades ~2^-8 of the delta for AMX/AVX512-BF16 speed).
- **Memory.** Fresh pages are expensive on a VM that hands freed memory back to its host
  (~0.5-1 GB/s here, slower than the sum), so read buffers go round a pool, and
  ``to_dict(into=...)`` writes the result into tensors that already exist (the parameters of
  the model that will render). A kept result is necessarily one model of new memory.
- **Writes.** The output header (names, shapes, offsets, metadata) is known before any data,
  so each worker writes its result chunks in place with ``os.pwrite`` (GIL-free) from a
  per-thread staging buffer: no writer thread, no queue, no output buffers. The file is
  ``<out>.tmp`` (preallocated with ``posix_fallocate``: 2-5x faster on ext4 than delayed
  allocation), renamed into place at the end.

LoRA module names are mapped to checkpoint tensor names by a key map (a dict or a function,
injectable); :func:`lora_key_map` builds the default one for kohya (``lora_unet_…``,
``lora_te_…``) and diffusers (``unet.….lora_A``) names on checkpoints with diffusers names
(``unet.…``, the mini world) or the LDM names of real single files (via
``merger/ldm_keys.py``). LoRA files are read by the engine's own reader
(``merger.merge.read_lora``: LoHa, LoKr, LDM block names and the other formats it normalises).
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffgraph.files import disk_full, free_bytes, size_text
from diffgraph.safetensors_header import InvalidHeader, read_header

from . import ldm_keys
from .merge import MergeError, read_lora
from .recipe import BASE, MergeRecipe

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
RECIPE_METADATA_KEY = "diffgraph_recipe"
PAGE = mmap.PAGESIZE
MMAP_MIN_BYTES = 1 << 20  # smaller tensors are read with pread (a mapping per small tensor costs more)
READ_MODES = ("auto", "mmap", "pread")

# ---------------------------------------------------------------------------------------------
# inputs: a safetensors file read by byte range, or a dict already in memory
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # absolute offset in the file
    nbytes: int = 0


class _Madvise:
    """libc madvise/mincore through ctypes (a foreign call releases the GIL, Python's
    mmap.madvise does not, and the mmap module has no mincore)."""

    WILLNEED, POPULATE_READ = 3, 22

    def __init__(self):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.fn, self.mincore = libc.madvise, libc.mincore
            self.fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            self.fn.restype = self.mincore.restype = ctypes.c_int
        except (OSError, AttributeError):
            self.fn = self.mincore = None
        self.populate = True

    def resident(self, mm: mmap.mmap) -> bool:
        """Whether every page of the mapping is in the page cache (True when unknown)."""
        if self.mincore is None or len(mm) == 0:
            return True
        view = (ctypes.c_char * len(mm)).from_buffer(mm)
        try:
            pages = (len(mm) + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if self.mincore(ctypes.addressof(view), len(mm), vec) != 0:
                return True
            return bool(np.all(np.frombuffer(vec, dtype=np.uint8) & 1))
        finally:
            del view

    def prefault(self, mm: mmap.mmap) -> None:
        if self.fn is None or len(mm) == 0:
            return
        view = (ctypes.c_char * len(mm)).from_buffer(mm)
        try:
            addr = ctypes.addressof(view)
            self.fn(addr, len(mm), self.WILLNEED)
            if self.populate and self.fn(addr, len(mm), self.POPULATE_READ) != 0:
                self.populate = False  # kernel < 5.14: the first touch faults the pages in instead
        finally:
            del view


_MADVISE = _Madvise()


class FileSource:
    """One safetensors file: its checked header, and tensors read from their byte ranges."""

    def __init__(self, path: str | os.PathLike, read_mode: str = "auto"):
        self.path = Path(path)
        self.name = self.path.name
        if read_mode not in READ_MODES:
            raise ValueError(f"read_mode must be one of {', '.join(READ_MODES)}, not {read_mode!r}")
        self.read_mode = read_mode
        try:
            header = read_header(self.path)
        except (InvalidHeader, OSError) as exc:
            raise MergeError(str(exc)) from None
        self.metadata = header.metadata
        self._fd = os.open(self.path, os.O_RDONLY)
        start = header.data_start
        self.infos: dict[str, TensorInfo] = {}
        for key, info in header.tensors.items():
            if info["dtype"] not in ST_DTYPES:
                raise MergeError(f"{self.name}: tensor {key} has dtype {info['dtype']}, which the merge does not read")
            b, e = info["data_offsets"]
            self.infos[key] = TensorInfo(ST_DTYPES[info["dtype"]], tuple(info["shape"]), start + b, e - b)

    def keys(self) -> list[str]:
        return list(self.infos)

    def read(self, key: str) -> torch.Tensor:
        """The tensor, in its file dtype (a private read-only-in-practice mapping or a fresh buffer)."""
        return self.read_pooled(key, None)[0]

    def read_pooled(self, key: str, pool: _BufferPool | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tensor, the pool buffer it lives in, to give back once the tensor is used, or None)."""
        info = self.infos[key]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype), None
        if self.read_mode != "pread" and info.nbytes >= MMAP_MIN_BYTES:
            lead = info.offset % mmap.ALLOCATIONGRANULARITY
            # ACCESS_COPY: a private mapping (pages are shared with the page cache until written,
            # which the merge never does); writable, so torch takes it without a warning
            mm = mmap.mmap(self._fd, info.nbytes + lead, offset=info.offset - lead, access=mmap.ACCESS_COPY)
            # "auto": bytes already in the page cache are mapped; bytes on disk are read with
            # pread, whose large sequential reads measured twice as fast as faulting them in
            if self.read_mode == "mmap" or _MADVISE.resident(mm):
                _MADVISE.prefault(mm)
                raw = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=lead)
                return raw.view(info.dtype).reshape(info.shape), None
            mm.close()
        base = pool.get(info.nbytes) if pool is not None else None
        raw = base[:info.nbytes] if base is not None else torch.empty(info.nbytes, dtype=torch.uint8)
        view, done = memoryview(raw.numpy()), 0
        while done < info.nbytes:
            got = os.preadv(self._fd, [view[done:]], info.offset + done)
            if got <= 0:
                raise MergeError(f"{self.name}: file ended inside tensor {key} (changed while merging?)")
            done += got
        return raw.view(info.dtype).reshape(info.shape), base

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class MemorySource:
    """Tensors already in memory (e.g. the base pipeline's own weights)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "weights in memory"):
        self.tensors, self.name, self.metadata = tensors, name, {}
        self.infos = {k: TensorInfo(v.dtype, tuple(v.shape), 0, v.numel() * v.element_size()) for k, v in tensors.items()}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def read_pooled(self, key: str, pool=None) -> tuple[torch.Tensor, None]:
        return self.tensors[key], None

    def close(self) -> None:
        pass


def open_source(src, read_mode: str = "auto", name: str | None = None):
    if isinstance(src, (FileSource, MemorySource)):
        return src
    if isinstance(src, Mapping):
        return MemorySource(src, name or "weights in memory")
    return FileSource(src, read_mode)


# ---------------------------------------------------------------------------------------------
# LoRA files: modules (up, down, alpha) and where they land
# ---------------------------------------------------------------------------------------------

_KOHYA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|alpha)$")
_DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight")


@dataclass
class LoraModule:
    name: str  # as spelled in the file, without the .lora_down.weight/... suffix
    up: str
    down: str
    alpha: float | None  # None: alpha = rank (scale 1), the convention when a file has no alpha
    rank: int = 0
    target: str = ""  # checkpoint tensor key


def lora_modules(source) -> list[LoraModule]:
    """The low-rank modules of one LoRA as ``read_lora`` leaves it (kohya
    ``lora_down/lora_up/alpha`` or diffusers ``lora_A/lora_B``); a dict given directly must be in
    one of those forms, anything else is refused in one line."""
    groups: dict[str, dict[str, str]] = {}
    for key in source.keys():
        m = _KOHYA.match(key) or _PEFT.match(key)
        if m is None:
            raise MergeError(f"{source.name}: {key} is not a plain LoRA weight (lora_down/lora_up/alpha or "
                             f"lora_A/lora_B)")
        groups.setdefault(m.group("module"), {})[m.group("part")] = key
    modules = []
    for name, parts in groups.items():
        down = next((parts[p] for p in _DOWN if p in parts), None)
        up = next((parts[p] for p in parts if p != "alpha" and parts[p] != down), None)
        if down is None or up is None:
            if set(parts) == {"alpha"}:
                continue  # an alpha without matrices (some trainers write them for frozen modules)
            raise MergeError(f"{source.name}: LoRA module {name} lacks its {'down' if down is None else 'up'} matrix")
        alpha = None
        if "alpha" in parts:
            alpha = float(source.read(parts["alpha"]).float().reshape(-1)[0])
        rank = source.infos[down].shape[0] if source.infos[down].shape else 0
        modules.append(LoraModule(name, up, down, alpha, rank))
    return modules


KOHYA_COMPONENTS = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def _module_aliases(diffusers_module: str) -> list[str]:
    """The spellings a LoRA file may use for one diffusers module ("unet.down_blocks.0…to_q")."""
    comp, _, rest = diffusers_module.partition(".")
    names = [diffusers_module]
    rests = [rest]
    if comp.startswith("text_encoder") and not rest.startswith(("text_model.", "text_projection")):
        rests.append("text_model." + rest)  # transformers 5 flattened CLIPTextModel; files keep text_model
        names.append(f"{comp}.text_model.{rest}")
    prefixes = [KOHYA_COMPONENTS.get(comp)] + (["lora_te1"] if comp == "text_encoder" else [])
    for p in prefixes:
        if p:
            names += [f"{p}_{r.replace('.', '_')}" for r in rests]
    return names


def lora_key_map(checkpoint_infos: Mapping[str, TensorInfo] | Iterable[str], family: str | None = None,
                 configs: Mapping[str, Mapping] | None = None) -> dict[str, str]:
    """{LoRA module name (kohya or diffusers spelling) -> checkpoint tensor key} for a checkpoint.

    Checkpoints with diffusers names ("unet.…", "text_encoder.…") map directly. LDM-named
    single files ("model.diffusion_model.…") go through ``merger.ldm_keys.ldm_to_diffusers`` on
    meta tensors: each diffusers tensor is the very object it was converted from, which names
    its LDM key. ``family`` ("sd15", "sdxl") is guessed from the names when not given. Tensors
    the conversion splits (SDXL's fused OpenCLIP in_proj) get no entry, so a LoRA on them is
    refused rather than merged into the wrong rows.
    """
    infos = checkpoint_infos if isinstance(checkpoint_infos, Mapping) else {k: None for k in checkpoint_infos}
    keys = list(infos)
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        diffusers_to_ckpt = {k: k for k in keys}
    elif any(k.startswith("model.diffusion_model.") for k in keys):
        diffusers_to_ckpt = _ldm_correspondence(infos, family, configs)
    else:
        raise MergeError("cannot map LoRA names onto this checkpoint: its tensors have neither diffusers "
                         "(unet.…) nor LDM (model.diffusion_model.…) names; pass key_map=")
    out: dict[str, str] = {}
    for dkey, ckey in diffusers_to_ckpt.items():
        if dkey.endswith(".weight"):
            for alias in _module_aliases(dkey[: -len(".weight")]):
                out.setdefault(alias, ckey)
    return out


def _ldm_family(keys: Iterable[str]) -> str | None:
    """"sdxl" or "sd15" for a checkpoint with LDM names, None for one with diffusers names."""
    keys = list(keys)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        return None
    return "sdxl" if any(k.startswith("conditioner.embedders.") for k in keys) else "sd15"


def _ldm_correspondence(infos: Mapping[str, TensorInfo | None], family: str | None,
                        configs: Mapping[str, Mapping] | None) -> dict[str, str]:
    family = family or _ldm_family(infos)
    meta = {}
    for k, info in infos.items():
        if info is None:
            raise MergeError("mapping LoRA names onto LDM names needs the checkpoint's shapes")
        meta[k] = torch.empty(info.shape, dtype=info.dtype, device="meta")
    owner = {id(v): k for k, v in meta.items()}
    try:
        converted = ldm_keys.ldm_to_diffusers(meta, family, configs)
    except Exception as exc:  # LDMConversionError, or a config that does not fit the file
        raise MergeError(f"cannot map LoRA names onto this {family} checkpoint: {' '.join(str(exc).split())}") from exc
    out = {}
    for comp, state in converted.items():
        for dkey, t in state.items():
            if id(t) in owner:
                out[f"{comp}.{dkey}"] = owner[id(t)]
    return out


# ---------------------------------------------------------------------------------------------
# the plan: every check before the first byte of data is read
# ---------------------------------------------------------------------------------------------

@dataclass
class _LoraInput:
    source: object
    weight: float
    modules: list[LoraModule]


@dataclass
class MergeStats:
    seconds: float = 0.0
    read_seconds: float = 0.0  # in the worker threads: mapping/pre-faulting or reading inputs
    compute: float = 0.0  # in the worker threads: sums, LoRA matmuls and (to a file) writes
    lora: float = 0.0  # of which tensors with LoRA deltas
    wait: float = 0.0  # the ordering thread waiting for the next finished tensor
    bytes_in: int = 0
    bytes_out: int = 0
    tensors: int = 0
    lora_modules: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class _Job:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype
    float_: bool
    loras: list[tuple[int, LoraModule]] = field(default_factory=list)  # (lora input index, module)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


class StreamMerge:
    """K checkpoints (weights w_i) + N LoRAs (weights c_j), planned and checked on construction.

    ``checkpoints``: [(path or dict, weight)]; ``loras``: [(path or dict, weight)] where the
    weight multiplies (alpha/rank) up @ down exactly as A1111's <lora:name:weight> does.
    ``dtype``: output dtype (default: each tensor's dtype in the first checkpoint).
    ``key_map``: LoRA module name -> checkpoint key (dict or function; default :func:`lora_key_map`).
    ``lora_matmul``: "fp32" (default: up @ down in fp32, exact to fp32 rounding) or "bf16"
    (the factors rounded to bf16 and the product returned in bf16, then added in fp32: several
    times faster on CPUs with AMX/AVX512-BF16, the delta off by ~2^-8 of itself).
    """

    def __init__(self, checkpoints: Sequence[tuple[object, float]], loras: Sequence[tuple[object, float]] = (), *,
                 dtype: torch.dtype | None = None, key_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
                 family: str | None = None, read_mode: str = "auto", threads: int = 2,
                 prefetch_bytes: int = 128 << 20, chunk_elems: int = 1 << 18, lora_matmul: str = "fp32"):
        checkpoints, loras = list(checkpoints), list(loras)
        if not checkpoints:
            raise MergeError("no checkpoints to merge")
        self.threads, self.prefetch_bytes, self.chunk_elems = max(1, threads), prefetch_bytes, chunk_elems
        if lora_matmul not in ("fp32", "bf16"):
            raise ValueError(f"lora_matmul must be 'fp32' or 'bf16', not {lora_matmul!r}")
        self.lora_matmul = lora_matmul
        self.stats = MergeStats()
        self._sources = []
        try:
            self.ckpts = [(self._open(src, read_mode), float(w)) for src, w in checkpoints]
            family = family or _ldm_family(self.ckpts[0][0].infos)
            self.loras = [_LoraInput(self._open_lora(src, family), float(w), []) for src, w in loras]
            for _, w in self.ckpts + [(None, x.weight) for x in self.loras]:
                if not math.isfinite(w):
                    raise MergeError(f"merge weight {w} is not a finite number")
            self.jobs = self._plan_checkpoints(dtype)
            if self.loras:
                self._plan_loras(key_map, family)
        except BaseException:
            self.close()
            raise

    def _open(self, src, read_mode):
        s = open_source(src, read_mode)
        self._sources.append(s)
        return s

    def _open_lora(self, src, family: str | None):
        """A LoRA file through the engine's own reader (merger.merge.read_lora: any format it
        normalises, held in memory: LoRAs are small next to checkpoints); a dict as it is."""
        if isinstance(src, (str, os.PathLike)):
            unet_config = None
            if family in ldm_keys.FAMILIES:  # kohya files with LDM block names map through the real UNet's config
                from .real_pipelines import shipped_configs

                unet_config = shipped_configs(family).get("unet")
            src = MemorySource(read_lora(Path(src), family, unet_config=unet_config).matrices, Path(src).name)
        return self._open(src, "auto")

    def _plan_checkpoints(self, dtype) -> list[_Job]:
        first = self.ckpts[0][0]
        keys = first.keys()
        for src, _ in self.ckpts[1:]:
            if set(src.keys()) != set(keys):
                missing, extra = sorted(set(keys) - set(src.keys())), sorted(set(src.keys()) - set(keys))
                example = (missing or extra)[0]
                raise MergeError(f"{src.name} has different tensors from {first.name} ({len(missing)} missing, "
                                 f"{len(extra)} extra, e.g. {example})")
        jobs = []
        # the first file's order is its byte order: reads stay sequential
        for key in sorted(keys, key=lambda k: first.infos[k].offset):
            info = first.infos[key]
            is_float = info.dtype.is_floating_point
            for src, _ in self.ckpts[1:]:
                other = src.infos[key]
                if other.shape != info.shape:
                    raise MergeError(f"{src.name}: tensor {key} has shape {list(other.shape)}, "
                                     f"{first.name} has {list(info.shape)}")
                if other.dtype.is_floating_point != is_float:
                    raise MergeError(f"{src.name}: tensor {key} is {other.dtype}, {first.name} has {info.dtype}")
            out_dtype = (dtype or info.dtype) if is_float else info.dtype
            jobs.append(_Job(key, info.shape, out_dtype, is_float))
        return jobs

    def _plan_loras(self, key_map, family) -> None:
        if key_map is None:
            key_map = lora_key_map(self.ckpts[0][0].infos, family)
        lookup = key_map.get if isinstance(key_map, Mapping) else key_map
        by_key = {job.key: job for job in self.jobs}
        for j, lora in enumerate(self.loras):
            lora.modules = lora_modules(lora.source)
            if not lora.modules:
                raise MergeError(f"{lora.source.name}: no LoRA modules in the file")
            for mod in lora.modules:
                target = lookup(mod.name)
                if target is None or target not in by_key:
                    raise MergeError(f"{lora.source.name}: LoRA module {mod.name} targets "
                                     f"{target or 'a tensor'} that the checkpoint does not have")
                job = by_key[target]
                up, down = lora.source.infos[mod.up].shape, lora.source.infos[mod.down].shape
                numel = math.prod(job.shape)
                ok = (job.float_ and job.shape and len(up) >= 2 and len(down) >= 2 and down[0] > 0
                      and up[1] == down[0] and up[0] == job.shape[0] and math.prod(up[2:]) == 1
                      and up[0] * math.prod(down[1:]) == numel)
                if not ok:
                    raise MergeError(f"{lora.source.name}: LoRA module {mod.name} (up {list(up)}, down {list(down)}) "
                                     f"does not fit {target} {list(job.shape)}")
                mod.target = target
                job.loras.append((j, mod))
                self.stats.lora_modules += 1

    # -----------------------------------------------------------------------------------------
    # running it

    def to_dict(self, into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The merged tensors, in memory. ``into``: tensors to write the result into where name,
        shape and dtype match (e.g. the parameters of the model that will render, or the
        previous result): no fresh memory, which on a VM costs more than the sum itself. They
        may be inputs as well (each chunk is read before it is written)."""
        out: dict[str, torch.Tensor] = {}
        self._run(lambda job, t: out.__setitem__(job.key, t), into=into)
        return out

    def to_file(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, fsync: bool = False) -> Path:
        """Write the merged tensors as one safetensors file, as they are computed: the header
        fixes every tensor's offset, so each worker writes its result chunks in place (pwrite)
        and nothing but scratch buffers is ever held."""
        path = Path(path)
        meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        header, offset, starts = {"__metadata__": meta}, 0, {}
        for job in self.jobs:
            header[job.key] = {"dtype": ST_NAMES[job.dtype], "shape": list(job.shape),
                               "data_offsets": [offset, offset + job.nbytes]}
            starts[job.key] = offset
            offset += job.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
        data_start, total = 8 + len(raw), 8 + len(raw) + offset
        tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if hasattr(os, "posix_fallocate"):
                try:  # blocks allocated up front: measured 2-5x faster writes on ext4 than delayed allocation
                    os.posix_fallocate(fd, 0, total)
                except OSError as exc:
                    if disk_full(exc):  # said before any work, rather than after the merge of most of it
                        raise MergeError(f"{path.name}: the merged model needs {size_text(total)} and its disk "
                                         f"has {size_text(free_bytes(path.parent))} free") from None
            _pwrite_all(fd, memoryview(len(raw).to_bytes(8, "little") + raw), 0)
            self._run(lambda job, t: None, out_fd=fd, offsets={k: data_start + v for k, v in starts.items()})
            if fsync:
                os.fsync(fd)
        except BaseException as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and disk_full(exc):  # no fallocate here, or another writer took the room
                raise MergeError(f"{path.name}: the disk filled up while writing the merged model "
                                 f"({size_text(total)}); nothing was written") from None
            raise
        os.close(fd)
        if tmp.stat().st_size != total:
            tmp.unlink(missing_ok=True)
            raise MergeError(f"{path.name}: wrote {tmp.stat().st_size} bytes, expected {total}")
        os.replace(tmp, path)
        return path

    def _input_bytes(self, job: _Job) -> int:
        n = sum(src.infos[job.key].nbytes for src, _ in self.ckpts)
        return n + sum(self.loras[j].source.infos[m.up].nbytes + self.loras[j].source.infos[m.down].nbytes
                       for j, m in job.loras)

    def _run(self, sink: Callable[[_Job, torch.Tensor | None], None], into: Mapping[str, torch.Tensor] | None = None,
             out_fd: int | None = None, offsets: Mapping[str, int] | None = None) -> None:
        """Jobs run on a small thread pool (read, then sum, then write in place when writing a
        file: reads, torch and pwrite release the GIL), at most ``prefetch_bytes`` of inputs
        ahead; results reach ``sink`` in file order."""
        t_start = time.perf_counter()
        st = self.stats
        local = threading.local()
        in_pool = _BufferPool() if any(isinstance(s, FileSource) and s.read_mode != "mmap" for s in self._sources) else None
        lock = threading.Lock()

        def process(job: _Job):
            t0 = time.perf_counter()
            reads = [src.read_pooled(job.key, in_pool) for src, _ in self.ckpts]
            ls = []
            for j, m in job.loras:
                src = self.loras[j].source
                up, down = src.read_pooled(m.up, in_pool), src.read_pooled(m.down, in_pool)
                ls.append((up[0], down[0], j, m))
                reads += [up, down]
            t1 = time.perf_counter()
            scratch = getattr(local, "scratch", None)
            if scratch is None:
                scratch = local.scratch = _Scratch(self.chunk_elems)
            xs = [t for t, _ in reads[:len(self.ckpts)]]
            result = None
            if out_fd is not None:
                self._compute(job, xs, ls, scratch, emit=_file_emitter(out_fd, offsets[job.key]))
            else:
                dest = into.get(job.key) if into is not None else None
                if dest is not None and (tuple(dest.shape) != job.shape or dest.dtype != job.dtype
                                         or not dest.is_contiguous() or dest.device.type != "cpu"):
                    dest = None
                result = dest if dest is not None else torch.empty(job.shape, dtype=job.dtype)
                self._compute(job, xs, ls, scratch, out=result.detach())
            t2 = time.perf_counter()
            del ls, xs
            if in_pool is not None:
                for _, b in reads:
                    if b is not None:
                        in_pool.put(b)
            with lock:
                st.read_seconds += t1 - t0
                st.compute += t2 - t1
                if job.loras:
                    st.lora += t2 - t1
            return result

        workers = ThreadPoolExecutor(self.threads, thread_name_prefix="diffgraph-merge")
        window: deque = deque()
        in_flight, nxt = 0, 0
        try:
            while nxt < len(self.jobs) or window:
                while nxt < len(self.jobs) and (not window or in_flight < self.prefetch_bytes):
                    job = self.jobs[nxt]
                    size = self._input_bytes(job)
                    window.append((job, size, workers.submit(process, job)))
                    in_flight += size
                    nxt += 1
                job, size, fut = window.popleft()
                t0 = time.perf_counter()
                out = fut.result()
                st.wait += time.perf_counter() - t0
                in_flight -= size
                st.bytes_in += size
                st.bytes_out += job.nbytes
                st.tensors += 1
                sink(job, out)
        finally:
            for _, _, fut in window:
                fut.cancel()
            workers.shutdown(wait=True)
            st.seconds += time.perf_counter() - t_start

    def _compute(self, job: _Job, xs: list[torch.Tensor], ls: list, scratch: _Scratch, out: torch.Tensor | None = None,
                 emit: Callable[[int, torch.Tensor], None] | None = None) -> None:
        """The merged tensor, into ``out`` or chunk by chunk to ``emit(byte offset, chunk)``."""
        ws = [w for _, w in self.ckpts]
        if not job.float_ or (len(xs) == 1 and ws[0] == 1.0 and not ls and xs[0].dtype == job.dtype):
            # integer buffers (e.g. position ids) are taken from the first checkpoint; a lone
            # checkpoint at weight 1 is copied
            if emit is not None:
                emit(0, xs[0])
            elif out.data_ptr() != xs[0].data_ptr():
                out.copy_(xs[0])
            return
        numel = math.prod(job.shape)
        if not ls:
            _weighted_sum([x.reshape(-1) for x in xs], ws, scratch, numel, 1, job.dtype,
                          out=None if out is None else out.view(-1), emit=emit)
            return
        rows = job.shape[0]
        cols = numel // rows
        bs, as_ = [], []
        for up, down, j, m in ls:
            c = self.loras[j].weight * ((m.alpha if m.alpha is not None else m.rank) / m.rank)
            bs.append(up.reshape(rows, -1).to(torch.float32) * c)
            as_.append(down.reshape(down.shape[0], -1))
        mm_dtype = torch.bfloat16 if self.lora_matmul == "bf16" else torch.float32
        b = (torch.cat(bs, dim=1) if len(bs) > 1 else bs[0]).to(mm_dtype)
        a = torch.cat([x.to(mm_dtype) for x in as_], dim=0) if len(as_) > 1 else as_[0].to(mm_dtype)
        _weighted_sum([x.reshape(rows, cols) for x in xs], ws, scratch, rows, cols, job.dtype,
                      out=None if out is None else out.view(rows, cols), emit=emit, lora=(b, a))

    def close(self) -> None:
        for s in self._sources:
            s.close()
        self._sources = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done, n = 0, len(data)
    while done < n:
        got = os.pwrite(fd, data[done:], offset + done)
        if got <= 0:
            raise OSError(f"pwrite wrote nothing at offset {offset + done}")
        done += got


def _file_emitter(fd: int, start: int) -> Callable[[int, torch.Tensor], None]:
    def emit(offset: int, t: torch.Tensor) -> None:
        if t.numel():
            _pwrite_all(fd, memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()), start + offset)
    return emit


class _BufferPool:
    """Byte buffers that go round (power-of-two sizes; a request takes a free buffer of its own
    size or up to 4x larger): on a VM that hands freed memory back to its host, touching fresh
    pages cost ~0.5-1 GB/s here, more than reading the same bytes from the page cache."""

    def __init__(self):
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.allocated = 0

    def get(self, nbytes: int) -> torch.Tensor:
        size = max(1 << 16, 1 << max(nbytes - 1, 0).bit_length())
        with self._lock:
            for s in (size, size * 2, size * 4):
                if self._free.get(s):
                    return self._free[s].pop()
        self.allocated += size
        return torch.empty(size, dtype=torch.uint8)

    def put(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(buf.numel(), []).append(buf)


class _Scratch:
    """One worker's buffers: the fp32 accumulator, a widening buffer and an output staging chunk."""

    def __init__(self, n: int):
        self.n = n
        self.acc = torch.empty(n, dtype=torch.float32)
        self.tmp = torch.empty(n, dtype=torch.float32)
        self.stage = torch.empty(n * 8, dtype=torch.uint8)

    def ensure(self, n: int) -> None:
        if n > self.acc.numel():
            self.acc = torch.empty(n, dtype=torch.float32)
            self.tmp = torch.empty(n, dtype=torch.float32)
            self.stage = torch.empty(n * 8, dtype=torch.uint8)


def _weighted_sum(xs: list[torch.Tensor], ws: list[float], scratch: _Scratch, n: int, cols: int, dtype: torch.dtype,
                  out: torch.Tensor | None = None, emit: Callable[[int, torch.Tensor], None] | None = None,
                  lora=None) -> None:
    """round(sum_i w_i float(x_i) [+ B @ A]) chunk by chunk, into ``out`` or to ``emit``.

    Without a LoRA the inputs are flat (``cols`` = 1) and chunks are element ranges; with one
    they are (rows, cols) and chunks are row blocks. Bit for bit the result of
    ``acc = w_0 * x_0.float(); acc.add_(x_i.float(), alpha=w_i)`` (+ ``acc.addmm_(B, A)``)."""
    step = max(1, scratch.n // cols)
    scratch.ensure(step * cols)
    itemsize = _itemsize(dtype)
    for s in range(0, n, step):
        e = min(n, s + step)
        size = (e - s) * cols
        acc, tmp = scratch.acc[:size], scratch.tmp[:size]
        if lora is not None:
            acc, tmp = acc.view(e - s, cols), tmp.view(e - s, cols)
        x0 = xs[0][s:e]
        if x0.dtype == torch.float32:
            torch.mul(x0, ws[0], out=acc)
        else:
            acc.copy_(x0)
            acc.mul_(ws[0])
        for x, w in zip(xs[1:], ws[1:]):
            x = x[s:e]
            if x.dtype != torch.float32:
                tmp.copy_(x)
                x = tmp
            acc.add_(x, alpha=w)
        if lora is not None:
            b, a = lora
            if b.dtype == torch.float32:
                acc.addmm_(b[s:e], a)
            else:  # bf16 factors (AMX/AVX512-BF16): the product comes back in bf16
                tmp.copy_(torch.mm(b[s:e], a))
                acc.add_(tmp)
        if emit is None:
            out[s:e].copy_(acc)
        else:
            stage = scratch.stage[:size * itemsize].view(dtype).view(acc.shape)
            stage.copy_(acc)
            emit(s * cols * itemsize, stage)


# ---------------------------------------------------------------------------------------------
# the public entry points
# ---------------------------------------------------------------------------------------------

def stream_merge(checkpoints: Sequence[tuple[object, float]], loras: Sequence[tuple[object, float]] = (), *,
                 out: str | os.PathLike | None = None, metadata: Mapping[str, str] | None = None,
                 into: Mapping[str, torch.Tensor] | None = None, stats: MergeStats | None = None, **kw):
    """sum_i w_i C_i + sum_j c_j dW_j, streamed. Returns the dict of tensors (written into
    ``into``'s tensors where they fit, see :meth:`StreamMerge.to_dict`), or the written path
    when ``out`` is given (then nothing but a bounded window is ever in memory). ``stats``, if
    given, is filled with timings and byte counts. Keyword arguments go to :class:`StreamMerge`."""
    with StreamMerge(checkpoints, loras, **kw) as merge:
        try:
            return merge.to_dict(into) if out is None else merge.to_file(out, metadata)
        finally:
            if stats is not None:
                for k, v in merge.stats.as_dict().items():
                    setattr(stats, k, v)


def recipe_inputs(recipe, base: object | None = None) -> tuple[list[tuple[object, float]], list[tuple[object, float]]]:
    """A MergeRecipe's (checkpoints, loras) with their effective weights. A checkpoint entry
    named "base" is ``base`` (the base model's file or weights); a LoRA named "base" is an
    anchor with no delta and is left out. A recipe with no checkpoint merges just the base."""

    ckpts = []
    for e, w in recipe.checkpoint_weights():
        src = base if e.name == BASE else e.path
        if src is None:
            raise MergeError(f"checkpoint {e.name} has no file" if e.name != BASE else "the recipe uses the base "
                             "model's weights: pass base=")
        ckpts.append((src, w))
    if not ckpts:
        if base is None:
            raise MergeError("the recipe names no checkpoint: pass base=")
        ckpts = [(base, 1.0)]
    loras = []
    for e, w in recipe.lora_weights():
        if e.name == BASE:
            continue
        if e.path is None:
            raise MergeError(f"LoRA {e.name} has no file")
        loras.append((e.path, w))
    return ckpts, loras


def merge_recipe_to_file(recipe, out: str | os.PathLike, base: object | None = None,
                         stats: MergeStats | None = None, **kw) -> Path:
    """The recipe's merged model as one single-file .safetensors, the recipe JSON in its
    ``__metadata__`` (key "diffgraph_recipe") so the file says how it was made."""
    ckpts, loras = recipe_inputs(recipe, base)
    return stream_merge(ckpts, loras, out=out, metadata={RECIPE_METADATA_KEY: recipe.to_json()}, stats=stats, **kw)


def read_recipe_metadata(path: str | os.PathLike):
    """The MergeRecipe stored in a merged file's metadata (None when there is none)."""

    text = read_header(path).metadata.get(RECIPE_METADATA_KEY)
    return None if text is None else MergeRecipe.from_json(text)
