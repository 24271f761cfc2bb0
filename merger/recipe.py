"""MergeRecipe: everything needed to rebuild a merged model and re-render an image.

Coefficients are stored raw (as the planner produced them); the effective weights follow the
paper: checkpoints mix as softmax(w_ckpt)_i W_i and LoRA deltas add as softmax(w_peft)_j dW_j,
or, with ``lora_strength`` set, each LoRA delta at its own strength (see MergeRule).
A recipe is small JSON, embedded in every PNG, so any image can be replayed bit for bit.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

BASE = "base"  # a checkpoint entry with this name means "the base model's own weights"; a LoRA entry, "no delta"


@dataclass
class ExpertWeight:
    name: str  # expert id (e.g. "civitai:12" or a mini-world slug) or BASE
    coefficient: float
    path: str | None = None  # local safetensors file (None for BASE)
    sha256: str | None = None


@dataclass(frozen=True)
class MergeRule:
    """How planner coefficients in (0, 1) become merge weights.

    PAPER is Sec. 3.3 as written: a softmax over the selected experts of each kind. Measured in
    the mini world (benchmarks/RESULTS.md) it leaves the planner almost nothing to decide: the
    weights of one kind always sum to 1 (a lone LoRA is always at full strength whatever its
    coefficient) and softmax of values in (0, 1) spans at most a factor e. ANCHORED adds the base
    as a zero-delta member of each softmax with a fixed coefficient and sharpens it with a
    temperature, so a coefficient can take an expert from about 0.1 to 0.9 of full strength.

    STRENGTHS keeps ANCHORED for checkpoints (full weights must stay a weighted average) but
    gives each LoRA its own strength, coefficient x ``lora_strength``, the way people stack
    LoRAs in A1111 (<lora:a:0.8> <lora:b:0.4>). Under either softmax the LoRA weights share one
    budget of 1, so two skills that each need most of their strength (stripes and a colour)
    cannot both have it, and "more of one" always means "less of another". Measured in
    benchmarks/RESULTS.md: the selected experts merged under it beat the same merge under
    ANCHORED by far more than the seed spread.
    """

    temperature: float = 1.0
    anchor: float | None = None
    lora_strength: float | None = None  # None: LoRA weights are a softmax like checkpoints


PAPER = MergeRule()
ANCHORED = MergeRule(temperature=0.2, anchor=0.5)
STRENGTHS = MergeRule(temperature=0.2, anchor=0.5, lora_strength=1.5)
RULES = {"paper": PAPER, "anchored": ANCHORED, "strengths": STRENGTHS}


@dataclass
class MergeRecipe:
    base_model: str
    prompt: str
    checkpoints: list[ExpertWeight] = field(default_factory=list)
    loras: list[ExpertWeight] = field(default_factory=list)
    seed: int = 0
    steps: int = 20
    guidance: float = 5.0
    scheduler: str = "DPMSolverMultistepScheduler"
    negative_prompt: str = ""
    width: int = 32
    height: int = 32
    temperature: float = 1.0  # of both softmaxes; 1.0 is the paper's rule
    lora_strength: float | None = None  # set: each LoRA at coefficient x this, no softmax (MergeRule)

    def softmax(self, values: list[float]) -> list[float]:
        if not values:
            return []
        scaled = [v / self.temperature for v in values]
        m = max(scaled)
        exps = [math.exp(v - m) for v in scaled]
        total = sum(exps)
        return [e / total for e in exps]

    def checkpoint_weights(self) -> list[tuple[ExpertWeight, float]]:
        return list(zip(self.checkpoints, self.softmax([c.coefficient for c in self.checkpoints])))

    def lora_weights(self) -> list[tuple[ExpertWeight, float]]:
        if self.lora_strength is not None:
            return [(c, c.coefficient * self.lora_strength) for c in self.loras]
        return list(zip(self.loras, self.softmax([c.coefficient for c in self.loras])))

    def checkpoint_key(self) -> str:
        """Identity of the merged base: what the merged-base cache is keyed by."""
        parts = [(c.name, c.sha256, round(w, 8)) for c, w in self.checkpoint_weights()]
        return json.dumps([self.base_model, parts])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["effective"] = {"checkpoints": {c.name: w for c, w in self.checkpoint_weights()},
                          "loras": {c.name: w for c, w in self.lora_weights()}}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MergeRecipe":
        d = {k: v for k, v in d.items() if k != "effective"}
        d["checkpoints"] = [ExpertWeight(**c) for c in d.get("checkpoints", [])]
        d["loras"] = [ExpertWeight(**c) for c in d.get("loras", [])]
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
