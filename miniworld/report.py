"""`diffgraph miniworld report`: measure the built mini world and write docs/miniworld.md.

It answers the questions the mini world exists for: do the scorers agree with ground truth,
does the base render common attributes well and rare ones badly, does every expert improve
its own skill over the base, and does the harmful one hurt. The picture grid shows the base
against each expert on prompts that need the expert's skill.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track

from diffgraph.grid import labelled_grid
from diffgraph.merger.render import DEFAULT_GUIDANCE, DEFAULT_STEPS, render

from . import artifacts_io, domain, training
from .experts import EXPERTS, ExpertSpec
from .scorers import MetricSuite, combined_reward, images_to_tensor

REPORT_SEED = 777


def scorer_accuracy(suite: MetricSuite, vae, n: int = 512, seed: int = REPORT_SEED) -> dict:
    """Attribute-classifier accuracy (clean and VAE-reconstructed images), MiniClip top-1
    retrieval among 16 captions, and how often the quality score ranks a sharp image above its
    blurred twin."""
    rng = random.Random(seed)
    scenes = [domain.sample_scene(rng, uniform=True) for _ in range(n)]
    clean = training.render_batch(scenes)
    with torch.no_grad():
        recon = vae.decode(vae.encode(clean).latent_dist.mean).sample.clamp(-1, 1)
    out: dict = {"n": n}
    for name, x in (("clean", clean), ("vae", recon)):
        preds = suite.predict_attributes(x)
        out[f"attribute_accuracy_{name}"] = {
            a: float(np.mean([p[a] == s.attrs[a] for p, s in zip(preds, scenes)])) for a in domain.ATTRIBUTES}
    captions = [domain.caption(s.attrs, rng) for s in scenes]
    with torch.no_grad():
        img_e, txt_e = suite.miniclip(recon, torch.as_tensor(suite.embed(captions)))
    hits = []
    for i in range(0, n - 15, 16):
        sim = img_e[i : i + 16] @ txt_e[i : i + 16].T
        hits.extend((sim.argmax(1) == torch.arange(16)).tolist())
    out["miniclip_top1_of_16"] = float(np.mean(hits))
    # Uniform scenes include monochrome, sepia and dark ones, in which an object's colour is
    # barely visible; the base is judged on common scenes, so say how well the judge sees there.
    common = [domain.sample_scene(rng, rare_rate=0.0) for _ in range(n)]
    preds = suite.predict_attributes(training.render_batch(common))
    out["attribute_accuracy_common"] = {
        a: float(np.mean([p[a] == s.attrs[a] for p, s in zip(preds, common)])) for a in ("shape", "color", "background")}
    from .scorers import quality_score

    sharp_scenes = [domain.Scene({**s.attrs, "blur": "sharp"}, s.dx, s.dy, s.size) for s in scenes[:128]]
    blurry_scenes = [domain.Scene({**s.attrs, "blur": "blurry"}, s.dx, s.dy, s.size) for s in scenes[:128]]
    q_sharp = quality_score(training.render_batch(sharp_scenes))
    q_blur = quality_score(training.render_batch(blurry_scenes))
    out["quality_sharp_over_blurry"] = float((q_sharp > q_blur).float().mean())
    return out


def skill_prompts(spec: ExpertSpec, n: int, seed: int) -> list[str]:
    """Prompts that ask for the expert's skill (plain prompts for the harmful one)."""
    rng = random.Random(seed)
    return [domain.caption(domain.sample_attrs(rng, rare_rate=0.0, force=spec.skill or None), rng, wild=0.0) for _ in range(n)]


def skill_rate(suite: MetricSuite, images, skill: dict) -> float:
    preds = suite.predict_attributes(images_to_tensor(images))
    return float(np.mean([all(p[a] == v for a, v in skill.items()) for p in preds]))


def mean_scores(suite: MetricSuite, images, prompts) -> dict:
    scores = suite.score(images, prompts)
    out = {m: float(np.mean([s[m] for s in scores])) for m in scores[0]}
    out["reward"] = float(np.mean([combined_reward(s) for s in scores]))
    return out


class ExpertSwitch:
    """Applies one expert to the base pipeline and restores the base afterwards."""

    def __init__(self, pipe, root: Path):
        self.pipe, self.root = pipe, root
        self.base_state = {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()}
                           for n in ("unet", "vae", "text_encoder")}

    def images(self, spec: ExpertSpec, prompts, seeds, scale: float = 1.0):
        path = artifacts_io.expert_file(spec.slug, self.root)
        if spec.kind == "lora":
            self.pipe.load_lora_weights(str(path), adapter_name=spec.slug.replace("-", "_"))
            self.pipe.set_adapters([spec.slug.replace("-", "_")], [scale])
            try:
                return render(self.pipe, prompts, seeds)
            finally:
                self.pipe.unload_lora_weights()
        artifacts_io.load_checkpoint_into(self.pipe, path)
        try:
            return render(self.pipe, prompts, seeds)
        finally:
            for name, sd in self.base_state.items():
                getattr(self.pipe, name).load_state_dict(sd)


def evaluate(root: Path = artifacts_io.ARTIFACTS, n: int = 48, grid_path: Path | None = None,
             console: Console | None = None) -> dict:
    """Measure scorers, base and every expert; optionally write the picture grid."""
    console = console or Console()
    torch.manual_seed(0)
    pipe = artifacts_io.load_pipeline(root)
    suite = artifacts_io.load_scorers(root)
    report: dict = {"samples_per_expert": n, "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}
    report["scorers"] = scorer_accuracy(suite, pipe.vae)

    rng = random.Random(REPORT_SEED)
    common = [domain.caption(domain.sample_attrs(rng, rare_rate=0.0), rng) for _ in range(2 * n)]
    seeds = list(range(2 * n))
    base_imgs = render(pipe, common, seeds)
    preds = suite.predict_attributes(images_to_tensor(base_imgs))
    targets = [domain.target_attrs(p) for p in common]
    report["base_common_accuracy"] = {
        a: float(np.mean([p[a] == t[a] for p, t in zip(preds, targets)])) for a in ("shape", "color", "background")}
    report["base_common_all_three"] = float(np.mean(
        [all(p[a] == t[a] for a in ("shape", "color", "background")) for p, t in zip(preds, targets)]))

    switch = ExpertSwitch(pipe, root)
    rows, experts = [], {}
    for spec in track(EXPERTS, description="experts", console=console):
        prompts = skill_prompts(spec, n, seed=sum(map(ord, spec.slug)))
        seeds = list(range(1000, 1000 + n))
        base_images = render(pipe, prompts, seeds)
        # each LoRA at the weight it is made for (ExpertSpec.bake), as its author would show it
        exp_images = switch.images(spec, prompts, seeds, scale=spec.best_weight)
        entry = {"base": mean_scores(suite, base_images, prompts), "expert": mean_scores(suite, exp_images, prompts)}
        if spec.kind == "lora":
            entry["lora_weight"] = spec.best_weight
        if spec.skill:
            entry["base_skill_rate"] = skill_rate(suite, base_images, spec.skill)
            entry["expert_skill_rate"] = skill_rate(suite, exp_images, spec.skill)
        experts[spec.slug] = entry
        gain = (f"{entry['base_skill_rate']:.0%}->{entry['expert_skill_rate']:.0%}" if spec.skill
                else f"reward {entry['base']['reward']:.2f}->{entry['expert']['reward']:.2f}")
        rows.append((f"{spec.slug}  {gain}", base_images[:4] + [None] + exp_images[:4]))
    report["experts"] = experts
    if grid_path is not None:
        labelled_grid(rows, grid_path, cell=48)
    return report


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1))


def markdown(report: dict) -> str:
    """The report's tables in markdown, for docs/miniworld.md."""
    lines = ["| attribute | classifier accuracy (clean) | (through the VAE) | (common scenes) |", "|---|---:|---:|---:|"]
    sc = report["scorers"]
    common = sc.get("attribute_accuracy_common", {})
    for a in sc["attribute_accuracy_clean"]:
        lines.append(f"| {a} | {sc['attribute_accuracy_clean'][a]:.3f} | {sc['attribute_accuracy_vae'][a]:.3f} | "
                     + (f"{common[a]:.3f} |" if a in common else "- |"))
    lines += ["", f"MiniClip top-1 caption retrieval among 16: {sc['miniclip_top1_of_16']:.3f}; "
              f"quality score ranks a sharp image above its blurred twin: {sc['quality_sharp_over_blurry']:.3f} "
              f"(n = {sc['n']}).", "",
              "Base model on prompts with common attributes only (n = "
              f"{2 * report['samples_per_expert']}): shape {report['base_common_accuracy']['shape']:.3f}, colour "
              f"{report['base_common_accuracy']['color']:.3f}, background {report['base_common_accuracy']['background']:.3f}, "
              f"all three right {report['base_common_all_three']:.3f}.", "",
              "| expert | LoRA weight | skill rate: base | with expert | gain | reward: base | with expert |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for slug, e in report["experts"].items():
        if "base_skill_rate" in e:
            gain = e["expert_skill_rate"] - e["base_skill_rate"]
            rates = f"{e['base_skill_rate']:.3f} | {e['expert_skill_rate']:.3f} | {gain:+.3f}"
        else:
            rates = "- | - | -"
        weight = f"{e['lora_weight']:.2f}" if "lora_weight" in e else "-"
        lines.append(f"| {slug} | {weight} | {rates} | {e['base']['reward']:.3f} | {e['expert']['reward']:.3f} |")
    return "\n".join(lines)
