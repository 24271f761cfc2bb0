"""The mini world's artifacts: they load offline, render deterministically, every expert file
lands in the pipeline (in each shipped format) and changes what is rendered, and every scorer
separates images that have its attribute from images that do not."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffgraph.merger.lora_coverage import coverage
from diffgraph.merger.render import render
from diffgraph.miniworld import artifacts_io, domain, training
from diffgraph.miniworld.experts import EXPERTS
from diffgraph.miniworld.scorers import quality_score

LORAS = [s for s in EXPERTS if s.kind == "lora"]
CKPTS = [s for s in EXPERTS if s.kind == "ckpt"]


@pytest.fixture(scope="module")
def pipe(artifacts_dir):
    return artifacts_io.load_pipeline(artifacts_dir)


@pytest.fixture(scope="module")
def suite(artifacts_dir):
    return artifacts_io.load_scorers(artifacts_dir)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def test_population_has_what_the_wild_has():
    assert len(EXPERTS) >= 20 and len(LORAS) >= 14 and len(CKPTS) >= 4
    assert {s.file_format for s in LORAS} == {"diffusers", "kohya"}
    assert any(s.corrupt for s in EXPERTS), "a harmful expert"
    assert {s.year for s in EXPERTS} == {1, 2}
    assert any(s.js_only_page for s in EXPERTS)


def test_manifest_hashes_match_files(artifacts_dir):
    from diffgraph.miniworld.build import sha256_file

    entries = artifacts_io.manifest(artifacts_dir)["experts"]
    assert {e["slug"] for e in entries} == {s.slug for s in EXPERTS}
    for e in entries:
        assert sha256_file(artifacts_dir / e["file"]) == e["sha256"], e["slug"]


def test_base_renders_deterministically_for_a_seed(pipe):
    prompts = ["a red circle on a white background", "a blue square on a gray background"]
    first = _pixels(render(pipe, prompts, [3, 4]))
    again = _pixels(render(pipe, prompts[::-1], [4, 3]))[::-1]  # order and batching must not matter
    other = _pixels(render(pipe, prompts, [5, 6]))
    assert first.shape == (2, 32, 32, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("spec", LORAS, ids=lambda s: f"{s.slug}-{s.file_format}")
def test_lora_lands_fully_and_changes_the_image(pipe, artifacts_dir, spec):
    path = artifacts_io.expert_file(spec.slug, artifacts_dir)
    state = load_file(str(path))
    if spec.file_format == "kohya":
        assert any(k.startswith("lora_unet_") for k in state) and any(k.endswith(".alpha") for k in state)
        assert any(k.startswith("lora_te_text_model_") for k in state)
    else:
        assert any(k.startswith("unet.") and ".lora_A." in k for k in state)
        assert any(k.startswith("text_encoder.") for k in state)
    prompt = ["a " + " ".join(domain.SYNONYMS[a][v][0] for a, v in spec.skill.items()) + " circle on a white background"]
    before = _pixels(render(pipe, prompt, [11]))
    name = spec.slug.replace("-", "_")
    pipe.load_lora_weights(str(path), adapter_name=name)
    try:
        landed, total = coverage(pipe, name, state)
        unet_adapted = [n for n, _ in pipe.unet.named_modules() if n.endswith(f"lora_A.{name}")]
        te_adapted = [n for n, _ in pipe.text_encoder.named_modules() if n.endswith(f"lora_A.{name}")]
        after = _pixels(render(pipe, prompt, [11]))
    finally:
        pipe.unload_lora_weights()
    assert total > 0 and landed == total, f"only {landed}/{total} LoRA matrices landed"
    assert unet_adapted and te_adapted
    assert np.abs(after - before).mean() > 0.5, "the adapter did not change the image"
    assert np.array_equal(_pixels(render(pipe, prompt, [11])), before), "unloading restores the base"


@pytest.mark.parametrize("spec", CKPTS, ids=lambda s: s.slug)
def test_checkpoint_loads_strictly_and_differs_from_base(pipe, artifacts_dir, spec):
    parts = artifacts_io.split_single_file(artifacts_io.expert_file(spec.slug, artifacts_dir))
    assert set(parts) == {"unet", "vae", "text_encoder"}
    for name, sd in parts.items():
        own = getattr(pipe, name).state_dict()
        assert set(sd) == set(own), name
    changed = sum(not torch.equal(parts["unet"][k].float(), v.half().float()) for k, v in pipe.unet.state_dict().items())
    assert changed > len(parts["unet"]) // 2, "a style fine-tune changes most UNet tensors"


def _ground_truth_pairs(attr: str, value: str, n: int, seed: int):
    """Scenes with the attribute and the same scenes with a different value of it."""
    rng = random.Random(seed)
    with_attr, without = [], []
    for _ in range(n):
        scene = domain.sample_scene(rng, rare_rate=0.0, force={attr: value})
        other = rng.choice([v for v in domain.ATTRIBUTES[attr] if v != value and v != scene.attrs.get("background")])
        with_attr.append(scene)
        without.append(domain.Scene({**scene.attrs, attr: other}, scene.dx, scene.dy, scene.size))
    return with_attr, without


@pytest.mark.parametrize("attr", sorted(domain.ATTRIBUTES))
def test_scorers_separate_images_with_and_without_the_attribute(suite, attr):
    """Per attribute, averaged over its values (docs/miniworld.md lists the weak values, e.g.
    teal against blue): the score of a prompt's image must beat the same scene with that
    attribute changed. A default ("sharp", "plain") is the absence of an attribute: only the
    classifier is asked to see it."""
    rng = random.Random(5)
    margins: dict[str, list[float]] = {"attr": [], "miniclip": []}
    for value in domain.ATTRIBUTES[attr]:
        if attr in ("color", "background") and value == "white":
            continue  # the same word names another attribute's value; the other colours cover it
        with_attr, without = _ground_truth_pairs(attr, value, 16, seed=sum(map(ord, attr + value)))
        prompts = [domain.caption({**s.attrs}, rng, mention_defaults=1.0, wild=0.0) for s in with_attr]
        good = suite.score(training.render_batch(with_attr), prompts)
        bad = suite.score(training.render_batch(without), prompts)
        is_default = attr in domain.OPTIONAL and value == domain.ATTRIBUTES[attr][0]
        for metric in ("attr",) if is_default else ("attr", "miniclip"):
            margins[metric].append(np.mean([s[metric] for s in good]) - np.mean([s[metric] for s in bad]))
    for metric, values in margins.items():
        assert np.mean(values) > 0, f"{metric} does not prefer the right {attr}: margins {np.round(values, 3)}"


def test_quality_score_prefers_sharp_images():
    rng = random.Random(9)
    scenes = [domain.sample_scene(rng, rare_rate=0.0) for _ in range(32)]
    sharp = quality_score(training.render_batch(scenes))
    blurry = quality_score(training.render_batch([domain.Scene({**s.attrs, "blur": "blurry"}, s.dx, s.dy, s.size)
                                                  for s in scenes]))
    assert (sharp > blurry).float().mean() > 0.9


def test_damage_judge_sees_burnt_images_and_spares_clean_ones(suite, pipe):
    """Clean scenes of every kind (blurry, dark, neon, patterned...), through the VAE as
    generated images are, against the same scenes burnt by training.burn."""
    rng = random.Random(13)
    gen = torch.Generator().manual_seed(13)
    x = training.render_batch([domain.sample_scene(rng, uniform=True) for _ in range(64)])
    with torch.no_grad():
        clean = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    burnt = training.burn(pipe.vae, clean, torch.full((64,), 0.6), gen)
    assert float(suite.damage(clean).mean()) < 0.15
    assert float((suite.damage(burnt) > suite.damage(clean)).float().mean()) > 0.9


def test_damage_judge_sees_a_real_overdose(pipe, suite, artifacts_dir):
    """Not only the synthetic burn it was trained on: a LoRA merged at three times its natural
    weight (the product's merge) burns images, and the judge says so."""
    from diffgraph.miniworld.experts import by_slug
    from diffgraph.miniworld.report import ExpertSwitch, prompts_for

    switch = ExpertSwitch(pipe, artifacts_dir)
    for slug in ("stripes-pro", "polka-dots", "ink-outline"):
        spec = by_slug(slug)
        prompts, seeds = prompts_for(spec.skill, 8, seed=3), list(range(8))
        natural = suite.score(switch.merged({slug: spec.best_weight}, prompts, seeds), prompts)
        burnt = suite.score(switch.merged({slug: 3 * spec.best_weight}, prompts, seeds), prompts)
        assert np.mean([s["damage"] for s in burnt]) > np.mean([s["damage"] for s in natural]) + 0.2, slug


def test_reward_prefers_a_clean_miss_to_a_burnt_hit(suite, pipe):
    """As ImageReward does: a burnt image that shows the asked-for skill scores below a clean
    image of the same scene without it."""
    from diffgraph.miniworld.scorers import combined_reward

    rng = random.Random(17)
    gen = torch.Generator().manual_seed(17)
    hits = [domain.sample_scene(rng, rare_rate=0.0, force={"texture": "stripes"}) for _ in range(32)]
    misses = [domain.Scene({**s.attrs, "texture": "plain"}, s.dx, s.dy, s.size) for s in hits]
    prompts = [domain.caption(s.attrs, rng, wild=0.0) for s in hits]
    burnt_hits = training.burn(pipe.vae, training.render_batch(hits), torch.full((32,), 0.8), gen)
    burnt = [combined_reward(s) for s in suite.score(burnt_hits, prompts)]
    clean = [combined_reward(s) for s in suite.score(training.render_batch(misses), prompts)]
    assert np.mean(np.array(clean) > np.array(burnt)) > 0.9


def test_the_world_has_the_wild_merging_hazards(pipe, suite, artifacts_dir):
    """What makes per-expert weights matter (docs/miniworld.md, "Merging hazards"): a stack
    at the weight every homepage recommends burns where the same LoRAs at half their natural
    weight do not, and an expert the prompt did not ask for, beside the right one, costs
    reward. A rebuild that loses either leaves a planner nothing to learn."""
    from diffgraph.miniworld.experts import by_slug
    from diffgraph.miniworld.report import ExpertSwitch, measure, prompts_for

    switch = ExpertSwitch(pipe, artifacts_dir)
    pink, stripes, dots = by_slug("pink-pop"), by_slug("stripes-pro"), by_slug("polka-dots")
    skill = {**pink.skill, **stripes.skill}
    prompts, seeds = prompts_for(skill, 8, seed=4), list(range(8))
    gentle = measure(suite, switch.merged({s.slug: 0.5 * s.best_weight for s in (pink, stripes)}, prompts, seeds),
                      prompts, skill)
    recommended = measure(suite, switch.merged({pink.slug: 1.0, stripes.slug: 1.0}, prompts, seeds), prompts, skill)
    assert recommended["damage"] > gentle["damage"] + 0.3
    assert recommended["reward"] < gentle["reward"] - 0.2

    prompts = prompts_for(stripes.skill, 8, seed=5)
    alone = measure(suite, switch.merged({stripes.slug: stripes.best_weight}, prompts, seeds), prompts, stripes.skill)
    beside = measure(suite, switch.merged({stripes.slug: stripes.best_weight, dots.slug: dots.best_weight}, prompts, seeds),
                      prompts, stripes.skill)
    assert beside["reward"] < alone["reward"] - 0.1
