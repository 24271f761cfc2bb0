"""MergeRecipe and MergeRule: what a merge is and what its numbers mean, in one place.

Coefficients are stored raw (as the planner produced them); the effective weights follow the
paper: checkpoints mix as softmax(w_ckpt)_i W_i and LoRA deltas add as softmax(w_peft)_j dW_j,
or, with ``lora_strength`` set, each LoRA delta at its own strength (see MergeRule). An entry
named BASE is the base model: among checkpoints its own weights, among LoRAs an anchor with no
delta that takes a share of the softmax. "Less of" and "more of" an expert are defined here
too (:meth:`MergeRecipe.less_of`). A recipe is small JSON, embedded in every PNG, so any image
can be replayed bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields

from diffgraph.errors import DiffGraphError, one_line

BASE = "base"  # a checkpoint entry with this name means "the base model's own weights"; a LoRA entry, "no delta"
LN2 = math.log(2.0)


class AtFullWeight(DiffGraphError, ValueError):
    """"More of" an expert that already has all the weight its rule allows."""


class RecipeError(DiffGraphError, ValueError):
    """Recipe JSON that is not a recipe (it comes from PNGs and files anyone may hand over)."""


MAX_RECIPE_CHARS = 1_000_000  # a recipe is a few KB; PNG text chunks and metadata can be far larger
_KINDS = {"str": (str,), "int": (int,), "float": (int, float)}


def _checked(cls, d, where: str) -> dict:
    """``d`` as keyword arguments of dataclass ``cls``: a JSON object whose keys are its fields
    and whose values have the fields' types (numbers finite), else RecipeError."""
    if not isinstance(d, dict):
        raise RecipeError(f"{where} must be a JSON object, not {type(d).__name__}")
    names = {f.name: str(f.type) for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise RecipeError(f"{where} has unknown field {unknown[0][:40]!r}")
    missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise RecipeError(f"{where} has no {missing[0]}")
    for name, kind in names.items():
        if name not in d or kind.startswith("list"):
            continue
        value, base = d[name], kind.split(" | ")[0]
        if value is None and kind.endswith("| None"):
            continue
        ok = isinstance(value, _KINDS[base]) and not isinstance(value, bool)
        if ok and base != "str" and not math.isfinite(value):
            ok = False
        if not ok:
            raise RecipeError(f"{where}.{name} must be { {'float': 'a finite number', 'int': 'an integer', 'str': 'a string'}[base]}"
                              f"{' or null' if kind.endswith('| None') else ''}")
    return d


@dataclass
class ExpertWeight:
    name: str  # expert id (e.g. "civitai:12") or BASE
    coefficient: float
    path: str | None = None  # local safetensors file (None for BASE)
    sha256: str | None = None
    file_name: str | None = None  # the file's published name, as it sits in the user's models/Lora


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

    def lora_coefficient(self, weight: float) -> float | None:
        """The coefficient that gives a LoRA ``weight`` (an A1111 <lora:name:weight>) under this
        rule, clipped to (0, 1]; None under a softmax, where no coefficient means one weight."""
        if self.lora_strength is None:
            return None
        return min(1.0, max(1e-3, weight / self.lora_strength))

    def recipe(self, base_model: str, prompt: str, seed: int, checkpoints: list[ExpertWeight],
               loras: list[ExpertWeight], **fields) -> "MergeRecipe":
        """A recipe of these experts under this rule: the anchor joins each softmax group that
        has experts, and the recipe records temperature and strength, so it replays exactly."""
        if self.anchor is not None:
            checkpoints = [ExpertWeight(BASE, self.anchor), *checkpoints] if checkpoints else []
            if self.lora_strength is None:
                loras = [ExpertWeight(BASE, self.anchor), *loras] if loras else []
        return MergeRecipe(base_model=base_model, prompt=prompt, seed=seed, checkpoints=list(checkpoints),
                           loras=list(loras), temperature=self.temperature, lora_strength=self.lora_strength, **fields)


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
    width: int | None = None  # None: the base's native size, filled in when it is rendered (MergeEngine.sized)
    height: int | None = None
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

    def _group(self, name: str) -> list[ExpertWeight]:
        for group in (self.checkpoints, self.loras):
            if any(e.name == name for e in group):
                return group
        raise KeyError(f"{name} is not in this recipe")

    def less_of(self, name: str) -> "MergeRecipe":
        """Half of expert ``name``: a LoRA at its own strength is halved; in a softmax group its
        odds against the rest are halved (coefficient - ln 2 x temperature), and when it is alone
        there, a BASE anchor with its coefficient takes half."""
        out = copy.deepcopy(self)
        group = out._group(name)
        entry = next(e for e in group if e.name == name)
        if group is out.loras and out.lora_strength is not None:
            entry.coefficient = round(entry.coefficient / 2, 6)
        elif len(group) == 1:
            group.append(ExpertWeight(BASE, entry.coefficient))
        else:
            entry.coefficient = round(entry.coefficient - LN2 * out.temperature, 6)
        return out

    def more_of(self, name: str) -> "MergeRecipe":
        """Twice expert ``name`` (the inverse of :meth:`less_of`), up to what the rule allows:
        a LoRA's own strength caps at coefficient 1; a lone member of a softmax already has it all."""
        out = copy.deepcopy(self)
        group = out._group(name)
        entry = next(e for e in group if e.name == name)
        if group is out.loras and out.lora_strength is not None:
            if entry.coefficient >= 1.0:
                raise AtFullWeight(f"is already at the rule's full strength ({out.lora_strength:.2f})")
            entry.coefficient = round(min(1.0, entry.coefficient * 2), 6)
        elif len(group) == 1:
            raise AtFullWeight("already has the full weight of its group (1.00)")
        else:
            entry.coefficient = round(entry.coefficient + LN2 * out.temperature, 6)
        return out

    def without_lone_anchors(self) -> "MergeRecipe":
        """A group holding only BASE entries means "no expert of this kind": it is emptied."""
        out = copy.deepcopy(self)
        for group in (out.checkpoints, out.loras):
            if group and all(e.name == BASE for e in group):
                group.clear()
        return out

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
        """The recipe ``to_dict`` wrote (its "effective" weights are derived, so ignored); any
        other shape raises RecipeError."""
        d = _checked(cls, {k: v for k, v in d.items() if k != "effective"} if isinstance(d, dict) else d, "recipe")
        for key in ("checkpoints", "loras"):
            if not isinstance(d.get(key, []), list):
                raise RecipeError(f"recipe.{key} must be a list")
            d[key] = [ExpertWeight(**_checked(ExpertWeight, c, f"recipe.{key}[{i}]"))
                      for i, c in enumerate(d.get(key, []))]
        return cls(**d)

    @classmethod
    def from_json(cls, text: str | bytes) -> "MergeRecipe":
        """A recipe from JSON text: the object itself, or one holding it under "recipe" (as
        PNGs and exports do); anything else raises RecipeError."""
        if len(text) > MAX_RECIPE_CHARS:
            raise RecipeError(f"recipe JSON is {len(text):,} characters; a recipe is at most {MAX_RECIPE_CHARS:,}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." nested past Python's stack
            raise RecipeError(f"recipe is not valid JSON ({one_line(exc, 120)})") from None
        if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
            data = data["recipe"]
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


MAX_TRIGGER_WORDS = 6  # per expert: the text encoder reads 77 tokens, and published lists run long
MAX_TRIGGER_CHARS = 60


def with_trigger_words(prompt: str, words_per_expert: list[list[str]] | list[tuple[str, ...]]) -> str:
    """``prompt`` with each expert's trigger words appended (", word"), as A1111 users write
    them: each word once, none the prompt already holds (case-insensitive, whole words), at
    most MAX_TRIGGER_WORDS per expert and none longer than MAX_TRIGGER_CHARS. A LoRA trained on
    a trigger word does little without it, so calibration and generation both render with them."""
    out = " ".join(prompt.split())
    for words in words_per_expert:
        kept = 0
        for word in words:
            word = " ".join(str(word).split()).strip(" ,")
            if not word or len(word) > MAX_TRIGGER_CHARS or kept >= MAX_TRIGGER_WORDS:
                continue
            kept += 1
            if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", out, re.IGNORECASE):
                continue
            out = f"{out}, {word}" if out else word
    return out
