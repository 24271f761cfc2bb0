"""A MergeRecipe as an AUTOMATIC1111 (and Forge) prompt.

The one A1111 rendering of a recipe: the PNG's "parameters" text (merger/png.py) and
``diffgraph export a1111`` both come from :func:`recipe_to_a1111`.

LoRAs become ``<lora:name:weight>`` tags: A1111 adds weight * (alpha/rank) * up @ down, the
very delta DiffGraph adds, so the tag's weight is the recipe's effective LoRA weight. ``name``
is the stem of the LoRA file's published name (A1111 finds LoRAs by file name in
``models/Lora``), else of its local file, else the expert id.

A prompt cannot hold a checkpoint merge, so the checkpoint part goes into ``#`` comment lines
(A1111 >= 1.8 strips them when "Enable comments" is on, its default) and into the ``Model:``
field of the parameters line. A1111 users reproduce the merged checkpoint either by loading the
single file DiffGraph writes (``merger.stream.merge_recipe_to_file``: LDM names, loads as it
is) or in the Checkpoint Merger tab with a chain of "Weighted sum" merges
(result = A*(1-M) + B*M): merging the first two with M = w2/(w1+w2), then that result with the
third at M = w3/(w1+w2+w3), and so on, gives sum_i w_i C_i exactly (up to rounding at each
saved step), because the recipe's checkpoint weights sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .recipe import BASE, ExpertWeight, MergeRecipe

A1111_SAMPLERS = {
    "DPMSolverMultistepScheduler": "DPM++ 2M", "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a", "DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
}
MERGED_NAME = "diffgraph-merge"


def _clean(name: str) -> str:
    # ':' ends a tag's name, '<' '>' end the tag, ',' splits the parameters line
    return "".join("_" if ch in ":<>,\n#" else ch for ch in name).strip() or "unnamed"


def file_stem(entry: ExpertWeight) -> str:
    """The name A1111 knows an expert's file by: the stem of its published file name, else of
    its local file, else the expert id (cleaned of what would break a tag)."""
    named = entry.file_name or entry.path
    return _clean(Path(named).stem if named else entry.name.split(":", 1)[-1].replace("/", "_"))


def checkpoint_name(entry: ExpertWeight, recipe: MergeRecipe) -> str:
    return _clean(recipe.base_model) if entry.name == BASE else file_stem(entry)


def _w(x: float) -> str:
    return f"{x:.4g}"


@dataclass
class MergerStep:
    """One "Weighted sum" in A1111's Checkpoint Merger tab: result = A*(1-M) + B*M."""

    a: str
    b: str
    multiplier: float
    result: str

    def describe(self) -> str:
        return f"A = {self.a}, B = {self.b}, Multiplier M = {_w(self.multiplier)} -> save as {self.result}"


def merger_steps(recipe: MergeRecipe, merged_name: str = MERGED_NAME) -> list[MergerStep]:
    """The chain of Weighted-sum merges that rebuilds sum_i w_i C_i (empty for 0 or 1 checkpoint)."""
    pairs = [(checkpoint_name(e, recipe), w) for e, w in recipe.checkpoint_weights()]
    if len(pairs) < 2:
        return []
    steps, current, total = [], pairs[0][0], pairs[0][1]
    for i, (name, w) in enumerate(pairs[1:], start=1):
        total += w
        result = merged_name if i == len(pairs) - 1 else f"{merged_name}-step{i}"
        steps.append(MergerStep(current, name, w / total if total else 0.0, result))
        current = result
    return steps


@dataclass
class A1111Prompt:
    prompt: str  # the positive prompt with <lora:…> tags
    negative_prompt: str
    parameters: str  # the "Steps: …, Sampler: …" line
    comments: list[str] = field(default_factory=list)
    steps: list[MergerStep] = field(default_factory=list)

    @property
    def infotext(self) -> str:
        """Prompt, negative prompt and parameters: what A1111 writes into a PNG's "parameters"."""
        negative = [f"Negative prompt: {self.negative_prompt}"] if self.negative_prompt else []
        return "\n".join([self.prompt, *negative, self.parameters])

    @property
    def text(self) -> str:
        """Comment lines, prompt, negative prompt and parameters, as A1111's infotext: paste it
        into the prompt box and press "Read generation parameters" (the ↙ button)."""
        return "\n".join([*(f"# {c}" for c in self.comments), self.infotext])


def recipe_to_a1111(recipe: MergeRecipe, merged_name: str = MERGED_NAME) -> A1111Prompt:
    """The recipe as an A1111 prompt (see the module docstring for how the checkpoint is rebuilt)."""
    loras = [(file_stem(e), w) for e, w in recipe.lora_weights() if e.name != BASE]
    tags = " ".join(f"<lora:{name}:{_w(w)}>" for name, w in loras)
    prompt = f"{recipe.prompt} {tags}".strip()
    ckpts = [(checkpoint_name(e, recipe), w) for e, w in recipe.checkpoint_weights()]
    model = ckpts[0][0] if len(ckpts) == 1 else (merged_name if ckpts else _clean(recipe.base_model))
    steps = merger_steps(recipe, merged_name)
    comments = [f"DiffGraph recipe (base model {recipe.base_model}); '#' lines are comments in A1111 >= 1.8."]
    if len(ckpts) > 1:
        comments.append("Checkpoint = " + " + ".join(f"{_w(w)} x {n}" for n, w in ckpts) + f". Load the merged "
                        f"single file as {merged_name}, or build it in the Checkpoint Merger tab, Weighted sum:")
        comments += [f"  {i}. {s.describe()}" for i, s in enumerate(steps, start=1)]
    elif ckpts and ckpts[0][1] != 1.0:
        comments.append(f"Checkpoint = {_w(ckpts[0][1])} x {ckpts[0][0]} (a scaled model: use the merged single file)")
    if loras:
        comments.append("LoRA tags name files in models/Lora; their weights are the recipe's effective weights.")
    anchors = [w for e, w in recipe.lora_weights() if e.name == BASE]
    if anchors:
        comments.append(f"The recipe's 'base' anchor takes {_w(anchors[0])} of the LoRA softmax and adds nothing.")
    fields = [f"Steps: {recipe.steps}", f"Sampler: {A1111_SAMPLERS.get(recipe.scheduler, recipe.scheduler)}",
              f"CFG scale: {recipe.guidance:g}", f"Seed: {recipe.seed}",
              *([f"Size: {recipe.width}x{recipe.height}"] if recipe.width and recipe.height else []),  # unrendered: unknown
              f"Model: {model}"]
    return A1111Prompt(prompt, recipe.negative_prompt, ", ".join(fields), comments, steps)
