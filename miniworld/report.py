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


def prompts_for(skill: dict, n: int, seed: int) -> list[str]:
    """Prompts with common attributes that ask for ``skill`` (an expert's, or several merged;
    plain prompts for {}, the harmful expert's)."""
    rng = random.Random(seed)
    return [domain.caption(domain.sample_attrs(rng, rare_rate=0.0, force=skill), rng, wild=0.0) for _ in range(n)]


def skill_rate(suite: MetricSuite, images, skill: dict) -> float:
    preds = suite.predict_attributes(images_to_tensor(images))
    return float(np.mean([all(p[a] == v for a, v in skill.items()) for p in preds]))


def mean_scores(suite: MetricSuite, images, prompts) -> dict:
    scores = suite.score(images, prompts)
    out = {m: float(np.mean([s[m] for s in scores])) for m in scores[0]}
    out["reward"] = float(np.mean([combined_reward(s) for s in scores]))
    return out


class ExpertSwitch:
    """Renders the base with experts merged in through the product's own merge (MergeEngine:
    LoRA deltas at their weights, a checkpoint in place of the base), so what the report
    measures is what DiffGraph renders."""

    def __init__(self, pipe, root: Path):
        from diffgraph.merger.engine import MergeEngine

        self.engine, self.root = MergeEngine(pipe), root

    def merged(self, loras: dict[str, float], prompts, seeds, checkpoint: str | None = None):
        """Images with each LoRA slug at its weight, on ``checkpoint`` (a slug) or the base."""
        from diffgraph.merger.engine import load_state
        from diffgraph.merger.recipe import ExpertWeight, MergeRecipe

        def entry(slug, weight):
            return ExpertWeight(slug, weight, path=str(artifacts_io.expert_file(slug, self.root)))

        recipe = MergeRecipe("miniworld-sd", "", checkpoints=[entry(checkpoint, 1.0)] if checkpoint else [],
                             loras=[entry(slug, w) for slug, w in loras.items()], lora_strength=1.0)
        load_state(self.engine.pipe, self.engine.weights(recipe))
        try:
            return render(self.engine.pipe, prompts, seeds)
        finally:
            load_state(self.engine.pipe, self.engine.base_state)

    def images(self, spec: ExpertSpec, prompts, seeds, scale: float = 1.0):
        if spec.kind == "lora":
            return self.merged({spec.slug: scale}, prompts, seeds)
        return self.merged({}, prompts, seeds, checkpoint=spec.slug)


OVERDOSE = (0.5, 1.0, 2.0, 3.0)  # multiples of a LoRA's natural weight
# LoRAs stacked for a prompt that asks for all their skills (the hazard: damage grows with their
# summed strength) and pairs where the second expert's skill is not asked for (interference:
# a marginally relevant expert retrieval returns beside the right one).
STACKS = (("pink-pop", "stripes-pro"), ("diamond-cut", "mint-backdrop"), ("tangerine", "checkerboard", "navy-backdrop"),
          ("royal-purple", "plus-cross", "polka-dots", "golden-hour"))
INTERFERENCE = (("stripes-pro", "polka-dots"), ("stripes-pro", "pattern-master"), ("pink-pop", "pastel-dream"),
                ("teal-tone", "night-mode"), ("mint-backdrop", "navy-backdrop"))


def measure(suite: MetricSuite, images, prompts, skill: dict) -> dict:
    out = mean_scores(suite, images, prompts)
    out["skill_rate"] = skill_rate(suite, images, skill)
    return out


def hazards(switch: ExpertSwitch, suite: MetricSuite, n: int = 16) -> dict:
    """The merging hazards of the wild, measured in the mini world through the product's merge.

    - overdose: each LoRA alone at OVERDOSE x its natural weight (1 / bake) on prompts asking
      for its skill (A1111 #13788: LoRAs "overcook" past their strength);
    - stacking: STACKS on prompts asking for every skill, each LoRA at m x its natural weight
      (m = 0.5, 1, 1.5) and all at 1.0, the weight every homepage recommends (ComfyUI-Lora-Manager
      #857, sd-mecha #45: stacked LoRAs burn);
    - interference: INTERFERENCE pairs on prompts asking only for the first expert's skill, the
      first alone and with the second at its natural weight beside it."""
    by = {s.slug: s for s in EXPERTS}
    seeds = list(range(2000, 2000 + n))
    out: dict = {"overdose": {}, "stacking": [], "interference": []}
    for spec in (s for s in EXPERTS if s.kind == "lora" and s.skill):
        prompts = prompts_for(spec.skill, n, seed=sum(map(ord, spec.slug)) + 1)
        out["overdose"][spec.slug] = {str(m): measure(suite, switch.merged({spec.slug: m * spec.best_weight}, prompts, seeds),
                                                       prompts, spec.skill) for m in OVERDOSE}
    for slugs in STACKS:
        skill = {a: v for slug in slugs for a, v in by[slug].skill.items()}
        prompts = prompts_for(skill, n, seed=len(out["stacking"]) + 31)
        settings = {f"natural x{m}": {s: m * by[s].best_weight for s in slugs} for m in (0.5, 1.0, 1.5)}
        settings["all at 1.0 (recommended)"] = {s: 1.0 for s in slugs}
        for label, weights in settings.items():
            row = measure(suite, switch.merged(weights, prompts, seeds), prompts, skill)
            row.update(experts=list(slugs), setting=label,
                       summed_strength=float(sum(w / by[s].best_weight for s, w in weights.items())))
            out["stacking"].append(row)
    for first, second in INTERFERENCE:
        skill = by[first].skill
        prompts = prompts_for(skill, n, seed=len(out["interference"]) + 77)
        alone = measure(suite, switch.merged({first: by[first].best_weight}, prompts, seeds), prompts, skill)
        if by[second].kind == "lora":
            both = switch.merged({first: by[first].best_weight, second: by[second].best_weight}, prompts, seeds)
        else:
            both = switch.merged({first: by[first].best_weight}, prompts, seeds, checkpoint=second)
        out["interference"].append({"expert": first, "beside": second, "alone": alone,
                                    "with": measure(suite, both, prompts, skill)})
    return out


def damage_judge(suite: MetricSuite, vae, n: int = 256, seed: int = REPORT_SEED) -> dict:
    """How well the damage judge separates clean images (through the VAE) from the same images
    burnt (training.burn) at severities it was and was not trained near."""
    rng = random.Random(seed + 1)
    gen = torch.Generator().manual_seed(seed)
    scenes = [domain.sample_scene(rng, uniform=i % 2 == 0) for i in range(n)]
    with torch.no_grad():
        clean = vae.decode(vae.encode(training.render_batch(scenes)).latent_dist.mean).sample.clamp(-1, 1)
    clean_damage = suite.damage(clean)
    out = {"n": n, "clean_mean": float(clean_damage.mean())}
    for severity in (0.2, 0.5, 1.0):
        burnt = suite.damage(training.burn(vae, clean, torch.full((n,), severity), gen))
        # the share of (clean, burnt) pairs ranked right: the AUC of clean against this severity
        out[f"auc_{severity}"] = float((burnt[:, None] > clean_damage[None, :]).float().mean())
        out[f"burnt_mean_{severity}"] = float(burnt.mean())
    return out


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

    report["base_common_damage"] = float(np.mean([s["damage"] for s in suite.score(base_imgs, common)]))
    report["damage_judge"] = damage_judge(suite, pipe.vae)

    switch = ExpertSwitch(pipe, root)
    rows, experts = [], {}
    for spec in track(EXPERTS, description="experts", console=console):
        prompts = prompts_for(spec.skill, n, seed=sum(map(ord, spec.slug)))
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
    report["hazards"] = hazards(switch, suite)
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
              f"all three right {report['base_common_all_three']:.3f}; mean damage {report['base_common_damage']:.3f}.", "",
              _judge_line(report["damage_judge"]), "",
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
    return "\n".join(lines + ["", hazards_markdown(report["hazards"])])


def _judge_line(j: dict) -> str:
    return (f"Damage judge (n = {j['n']}, images through the VAE): clean {j['clean_mean']:.3f}; burnt at severity 0.2 / 0.5 / 1.0: "
            f"{j['burnt_mean_0.2']:.3f} / {j['burnt_mean_0.5']:.3f} / {j['burnt_mean_1.0']:.3f} (AUC against clean "
            f"{j['auc_0.2']:.3f} / {j['auc_0.5']:.3f} / {j['auc_1.0']:.3f}).")


def hazards_markdown(h: dict) -> str:
    m = [str(x) for x in OVERDOSE]
    lines = ["Overdose: each LoRA alone at multiples of its natural weight, on prompts asking for its skill "
             "(reward / damage).", "",
             "| LoRA | " + " | ".join(f"x{x}" for x in m) + " |", "|---|" + "---:|" * len(m)]
    for slug, row in h["overdose"].items():
        lines.append(f"| {slug} | " + " | ".join(f"{row[x]['reward']:.3f} / {row[x]['damage']:.2f}" for x in m) + " |")
    lines += ["", "Stacking: LoRAs on prompts asking for all their skills; summed strength is the sum of "
              "weight / natural weight.", "", "| LoRAs | weights | summed strength | all skills seen | damage | reward |",
              "|---|---|---:|---:|---:|---:|"]
    for row in h["stacking"]:
        lines.append(f"| {' + '.join(row['experts'])} | {row['setting']} | {row['summed_strength']:.1f} | "
                     f"{row['skill_rate']:.3f} | {row['damage']:.3f} | {row['reward']:.3f} |")
    lines += ["", "Interference: a second expert at its natural weight beside the one the prompt needs.", "",
              "| expert | beside | skill rate alone | with | damage alone | with | reward alone | with |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in h["interference"]:
        a, w = row["alone"], row["with"]
        lines.append(f"| {row['expert']} | {row['beside']} | {a['skill_rate']:.3f} | {w['skill_rate']:.3f} | "
                     f"{a['damage']:.3f} | {w['damage']:.3f} | {a['reward']:.3f} | {w['reward']:.3f} |")
    return "\n".join(lines)
