"""The paper's experiments in the mini world (Tables 1, 2 and 5, in miniature).

    python -m diffgraph.benchmarks.paper_experiments [--prompts 24] [--steps 60]

1. Build the universal graph of the mini world with the GCA (or reuse --home).
2. Train the VGAE planner on training prompts (disjoint from the reference prompts and from
   the held-out test prompts), keeping the best policy on validation prompts: with REINFORCE
   (the paper's), or with --trainer distil by regression onto each training prompt's
   per-prompt optimum (``training_optima``, kept in --targets since the search is most of
   the cost). Every planner of the table is trained the same way.
3. On held-out prompts, render with each method and score with the mini metric suite, over
   three render seeds: Direct (base); single best retrieved expert (DiffAgent analogue);
   selected experts with equal weights (w/o MP); random coefficients; brain-chosen
   coefficients (retrieval similarity, the LLM-chosen analogue); one constant coefficient for
   every selected expert, the best of a grid on the validation prompts (the strongest plan
   that is not per expert: a planner that only learns "how strong overall" ties it); the
   VGAE; the VGAE over all experts keeping the top 10 (w/o ESA); 10 randomly activated
   experts; all experts merged (Diffusion Soup analogue); and, as a ceiling no method can
   reach by looking, each LoRA at the strength it was made for (the world's ground truth).
   Two more rows say how much room a planner has at all: LLM-chosen weights (the offline
   brain's stand-in: the weight each homepage recommends, as tools/plan.py's fallback reads
   it) and the per-prompt optimum, a black-box search (CMA-ES) of each prompt's coefficients
   against the reward on search seeds disjoint from the evaluation seeds, started from the best
   constant. "Optimum minus best constant" is the headroom of any per-expert, per-prompt plan.
   Parameter-based weights (Table 5's variant) come from the same VGAE trained the same way
   with each expert's node features replaced by a fixed random projection of its weight delta
   (``ParameterVectors``). Every method is compared with the VGAE and the best constant prompt
   by prompt (paired).
4. Scaling (Table 2): a planner trained with "year 1" experts only, used training-free with
   year 1 + year 2 experts, against the planner trained on both.

Writes benchmarks/results/paper_experiments.json and prints a markdown table.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress, TimeElapsedColumn

from diffgraph.benchmarks import write_result
from diffgraph.planner import search
from diffgraph.tools import bases

BASE = "miniworld-sd"
SEEDS = (0, 1, 2)
console = Console()


def _graph(home: Path, reference_prompts: int) -> None:
    """The graph, built with the offline brain whatever the environment configures (so runs
    compare), on DIFFGRAPH_HUB_PORT's port (so two runs can crawl at once)."""
    from diffgraph.agents.gca import run_pass
    from diffgraph.settings import Settings, get_settings

    if (home / "catalog.sqlite").exists():
        return
    settings = Settings(home=home, reference_prompts=reference_prompts, hub_port=get_settings().hub_port)
    run_pass(["miniworld"], settings=settings, console=console)


class Bench:
    def __init__(self, home: Path, rule):
        from diffgraph.graph_store.store import GraphStore

        self.store = GraphStore.open(home)
        self.engine = bases.engine_for(BASE)
        self.suite = bases.suite_for(BASE)
        self.rows = {r.id: r for r in self.store.catalog.list_experts(status="active")}
        self.rule = rule
        self._selection: dict[str, list[dict]] = {}

    def select(self, prompt: str) -> list[dict]:
        from diffgraph.agents.esa import select_experts

        if prompt not in self._selection:
            self._selection[prompt] = select_experts(self.store, prompt, BASE)["selected"]
        return self._selection[prompt]

    def score(self, prompt: str, picks: list[dict], coefficients: dict[str, float], seed: int) -> list[float]:
        from diffgraph.tools.render import build_recipe

        recipe = build_recipe(self.store, prompt, BASE, seed, picks, coefficients, self.rule)
        image = self.engine.render(recipe)
        vector = self.suite.score([image], [prompt])[0]
        return [*vector, self.suite.reward(vector)]

    def selection(self, prompt: str, active: set[str] | None = None) -> tuple[str, list[str], list[str]]:
        """``prompt``'s selection as planner.search takes it, only experts in ``active`` if given."""
        ids = [s["id"] for s in self.select(prompt) if active is None or s["id"] in active]
        return prompt, ids, [self.rows[i].kind for i in ids]

    def reward(self, prompt, expert_ids, kinds, w, seed) -> float:
        picks = [{"id": i} for i in expert_ids]
        return self.score(prompt, picks, dict(zip(expert_ids, w)), seed=seed)[-1]


def weight_delta(engine, row) -> "torch.Tensor":  # noqa: F821 (torch is imported inside)
    """An expert's whole weight delta from the base, flattened over every tensor in the base's
    key order: a LoRA's dW per layer (the engine's cached delta), a checkpoint's W - W_base;
    tensors the expert leaves alone are zeros."""
    import safetensors.torch
    import torch

    file, base = row.weights_file, engine.base_state
    if row.kind == "lora":
        dw = engine.lora_delta(Path(file.local_path), file.sha256)
    else:
        weights = safetensors.torch.load_file(file.local_path)
        dw = {k: weights[k].float() - base[k].float() for k in base if k in weights}
    return torch.cat([dw[k].flatten().float() if k in dw else torch.zeros(base[k].numel()) for k in sorted(base)])


class ParameterVectors:
    """The graph's vectors, except that an expert's vector is a feature of its parameters: its
    weight delta (``weight_delta``) times one fixed sparse random projection to the
    description embeddings' dimension (scikit-learn's SparseRandomProjection, seeded), scaled
    to unit length as the description embeddings are. A random projection keeps the angles
    between deltas (Johnson-Lindenstrauss), so experts that change the same weights the same
    way get near vectors, while nothing of what the homepage says reaches the planner. The
    length is dropped because featurise's cosines and the encoder expect unit vectors; the
    planner keeps the calibration edges, which carry each expert's measured strength."""

    def __init__(self, engine, rows: dict, dim: int, seed: int = 0):
        from sklearn.random_projection import SparseRandomProjection

        self.dim = dim
        deltas = np.stack([weight_delta(engine, row).numpy() for _, row in sorted(rows.items())])
        projected = SparseRandomProjection(dim, random_state=seed).fit_transform(deltas)
        projected /= np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)
        self.by_id = dict(zip(sorted(rows), projected.astype(np.float32)))

    def get_embeddings(self, ids, partitions) -> np.ndarray:
        """The VectorStore call graph_store's activated subgraph makes; ``partitions`` is not needed."""
        return np.asarray([self.by_id[i] for i in ids], dtype=np.float32).reshape(len(ids), self.dim)


def parameter_store(bench: Bench):
    """``bench.store`` whose expert vectors are ParameterVectors (the catalog is shared)."""
    dim = len(bench.store.embed(["dimension probe"])[0])
    return replace(bench.store, vectors=ParameterVectors(bench.engine, bench.rows, dim))


def selector(bench: Bench, active: set[str] | None = None):
    """The planner's ``select``: the ESA's experts for a prompt, only those in ``active`` if given."""
    return lambda prompt: bench.selection(prompt, active)[1]


def training_optima(bench: Bench, prompts: list[str], start: float, renders: int, path: Path | None,
                    active: set[str] | None = None) -> dict[str, dict[str, float]]:
    """The distil trainer's targets: each training prompt's per-prompt optimum over its selected
    experts (those in ``active`` if given; prompts left with none are left out), searched from
    the constant ``start``. Read from ``path`` when it holds the same prompts, experts and
    budget (the search is most of a distil run's cost), else searched and written there; a
    file that holds anything else is an error, never silently reused."""
    select = selector(bench, active)
    chosen = {p: ids for p in prompts if (ids := select(p))}
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if saved["renders"] == renders and {p: sorted(c) for p, c in saved["optima"].items()} == \
                {p: sorted(ids) for p, ids in chosen.items()}:
            return saved["optima"]
        raise typer.BadParameter(f"{path} holds the optima of other prompts, experts or budget", param_hint="--targets")
    optima = search.search_targets(bench.reward, [bench.selection(p, active) for p in chosen], start, renders,
                                   console=console)
    if path is not None:
        write_result(path, {"constant": start, "renders": renders, "optima": optima})
    return optima


def _train(bench: Bench, prompts: list[str], validation: list[str], steps: int, seed: int,
           active: set[str] | None = None, store=None, targets: dict | None = None):
    """REINFORCE (planner/train.py) for ``steps`` steps, or, given ``targets``, distillation
    onto them (planner/distil.py) for ``steps`` epochs; model selection on ``validation``."""
    select = selector(bench, active)
    if targets is not None:
        from diffgraph.planner.distil import DistilConfig, distil

        config = DistilConfig(epochs=steps, seed=seed)
        return distil(store or bench.store, targets, select, bench.reward, config=config, validation=validation,
                      console=console)
    from diffgraph.planner.train import TrainConfig, train

    config = TrainConfig(steps=steps, seed=seed)  # the product's batch: 16 prompts x 4 draws
    return train(store or bench.store, prompts, select, bench.reward, config=config, validation=validation,
                 console=console)


def best_constant(bench: Bench, prompts: list[str]) -> tuple[float, dict[float, float]]:
    """planner.search.best_constant on the prompts that select an expert."""
    return search.best_constant(bench.reward, [s for p in prompts if (s := bench.selection(p))[1]])


def coefficient_spread(bench: Bench, planner, prompts: list[str], store=None) -> dict:
    """How much the VGAE's plan varies between the experts of one prompt and across prompts:
    a planner that learned one global strength has spread ~0 on both."""
    plans = {p: planner.plan(store or bench.store, [s["id"] for s in sel], p) for p in prompts
             if (sel := bench.select(p))}
    values = [c for plan in plans.values() for c in plan.values()]
    within = [float(np.std(list(plan.values()))) for plan in plans.values() if len(plan) > 1]
    return {"mean": float(np.mean(values)), "std_all": float(np.std(values)), "min": float(np.min(values)),
            "max": float(np.max(values)), "mean_std_within_prompt": float(np.mean(within)) if within else 0.0,
            "plans": plans}


def expert_specs(bench: Bench) -> dict:
    """expert id -> the mini world's ExpertSpec behind its file (ground truth no method sees)."""
    from diffgraph.miniworld import artifacts_io
    from diffgraph.miniworld.experts import by_slug

    manifest = json.loads((artifacts_io.ARTIFACTS / "manifest.json").read_text())
    slug_by_sha = {e["sha256"]: e["slug"] for e in manifest["experts"]}
    return {expert_id: by_slug(slug_by_sha[row.files[0].sha256]) for expert_id, row in bench.rows.items()}


def oracle_coefficients(bench: Bench) -> dict[str, float] | None:
    """Per expert, the coefficient at which the rule gives a LoRA the weight it was trained at
    (ExpertSpec.best_weight, 1 / bake), clipped to (0, 1]; checkpoints keep 0.5. The ceiling of
    a plan that only has to get each expert's strength right, if strengths were what mattered.
    None under rules whose LoRA weights are a softmax."""
    if bench.rule.lora_strength is None:
        return None
    return {expert_id: min(1.0, spec.best_weight / bench.rule.lora_strength) if spec.kind == "lora" else 0.5
            for expert_id, spec in expert_specs(bench).items()}


def selection_relevance(bench: Bench, prompts: list[str]) -> dict:
    """How much of what the ESA selects the prompt asked for (ground truth: an expert is
    relevant when its skill is one of the prompt's attributes; the harmful and the style
    experts count by the same rule): the share of selected experts that are relevant, and the
    share of prompts whose selection holds at least one irrelevant expert beside a relevant
    one, the marginal-retrieval hazard a planner has to weaken."""
    from diffgraph.miniworld import domain

    specs = expert_specs(bench)
    relevant, mixed = [], []
    for prompt in prompts:
        asked = set(domain.parse_prompt(prompt).items())
        flags = [bool(specs[s["id"]].skill) and set(specs[s["id"]].skill.items()) <= asked for s in bench.select(prompt)]
        relevant.extend(flags)
        mixed.append(any(flags) and not all(flags))
    return {"selected": len(relevant), "relevant_share": float(np.mean(relevant)) if relevant else 0.0,
            "prompts_with_marginal_experts": float(np.mean(mixed)) if mixed else 0.0}


def prompt_split(prompts: int, train_prompts: int, validation_prompts: int) -> tuple[list[str], list[str], list[str]]:
    """Training, validation and test prompts of the mini world (tools/bases.prompt_split)."""
    return bases.prompt_split(bases.profile(BASE), prompts, train_prompts, validation_prompts)


def methods(bench: Bench, planner, rng: random.Random, constant: float, optimum: dict[str, dict],
            parameter_planner, parameters) -> dict:
    """name -> function(prompt) -> (picks, coefficients). ``optimum``: prompt -> its per-prompt
    optimum (planner.search.search_coefficients); ``parameter_planner``: the VGAE trained on
    ``parameters`` (``parameter_store``). A planner that is None drops the rows that need it."""
    from diffgraph.tools.plan import Planner

    all_ids = sorted(bench.rows)
    recommended = Planner(bench.store)  # no model: each LoRA at its recommended weight

    def base(p):
        return [], {}

    def single_best(p):
        sel = bench.select(p)
        return (sel[:1], {sel[0]["id"]: 0.5}) if sel else ([], {})

    def equal(p):
        sel = bench.select(p)
        return sel, {s["id"]: 0.5 for s in sel}

    def random_coef(p):
        sel = bench.select(p)
        return sel, {s["id"]: rng.random() for s in sel}

    def constant_coef(p):
        sel = bench.select(p)
        return sel, {s["id"]: constant for s in sel}

    def brain_coef(p):
        sel = bench.select(p)
        return sel, {s["id"]: float(s["similarity"]) for s in sel}

    def llm_coef(p):
        sel = bench.select(p)
        return sel, recommended.plan(p, sel)

    def optimum_coef(p):
        return bench.select(p), optimum[p]

    oracle = oracle_coefficients(bench)

    def oracle_coef(p):
        sel = bench.select(p)
        return sel, {s["id"]: oracle[s["id"]] for s in sel}

    def vgae(p):
        sel = bench.select(p)
        return sel, (planner.plan(bench.store, [s["id"] for s in sel], p) if sel else {})

    def parameter_vgae(p):
        sel = bench.select(p)
        return sel, (parameter_planner.plan(parameters, [s["id"] for s in sel], p) if sel else {})

    def vgae_no_esa(p):
        coef = planner.plan(bench.store, all_ids, p)
        top = sorted(coef, key=lambda i: -coef[i])[:10]
        return [{"id": i} for i in top], {i: coef[i] for i in top}

    def random_ten(p):
        ids = rng.sample(all_ids, 10)
        return [{"id": i} for i in ids], {i: 0.5 for i in ids}

    def all_experts(p):
        return [{"id": i} for i in all_ids], {i: 0.5 for i in all_ids}

    rows = {"Direct (base)": base, "Single best expert (DiffAgent)": single_best,
            "Equal weights (w/o MP)": equal, "Random coefficients": random_coef,
            "Brain-chosen coefficients (retrieval similarity)": brain_coef,
            "LLM-chosen weights (offline stand-in: recommended weights)": llm_coef,
            "Parameter-based weights (VGAE on weight-delta features)": parameter_vgae,
            f"Best constant coefficient ({constant}, tuned on validation)": constant_coef, "DiffGraph VGAE": vgae,
            "Per-prompt optimum (CMA-ES on search seeds)": optimum_coef,
            "VGAE over all, top 10 (w/o ESA)": vgae_no_esa, "Random 10 experts": random_ten,
            "All experts merged (Soup)": all_experts,
            **({"Oracle per-expert strength (knows ExpertSpec.bake)": oracle_coef} if oracle else {})}
    needs_planner = {"DiffGraph VGAE", "VGAE over all, top 10 (w/o ESA)"}
    return {name: fn for name, fn in rows.items()
            if not ((planner is None and name in needs_planner) or (parameter_planner is None and fn is parameter_vgae))}


def evaluate(bench: Bench, fns: dict, prompts: list[str]) -> dict:
    names = [*bench.suite.names, "reward"]
    out = {}
    for method, fn in fns.items():
        per_seed, rewards = [], []
        for seed in SEEDS:
            vectors = []
            for prompt in prompts:
                picks, coef = fn(prompt)
                vectors.append(bench.score(prompt, picks, coef, seed))
            per_seed.append(np.mean(vectors, axis=0))
            rewards.append([v[-1] for v in vectors])
        arr = np.array(per_seed)
        out[method] = {n: {"mean": float(arr[:, i].mean()), "std": float(arr[:, i].std())} for i, n in enumerate(names)}
        out[method]["per_prompt_reward"] = rewards  # seeds x prompts, for paired comparisons
        console.print(f"  {method:34} reward {out[method]['reward']['mean']:.4f} ± {out[method]['reward']['std']:.4f}")
    return out


def paired(results: dict, reference: str) -> dict:
    """Every method against ``reference``, prompt by prompt on the same seeds: the mean reward
    difference, its standard deviation over seeds (of the per-seed mean difference), its standard
    error over prompts (of the per-prompt difference averaged over seeds), and the prompts won,
    tied and lost."""
    ref = np.array(results[reference]["per_prompt_reward"])
    out = {}
    for method, row in results.items():
        diff = np.array(row["per_prompt_reward"]) - ref  # seeds x prompts
        per_prompt = diff.mean(axis=0)
        out[method] = {"mean": float(diff.mean()), "std_over_seeds": float(diff.mean(axis=1).std()),
                       "se_over_prompts": float(per_prompt.std(ddof=1) / np.sqrt(len(per_prompt))),
                       "won": int((per_prompt > 1e-9).sum()), "tied": int((np.abs(per_prompt) <= 1e-9).sum()),
                       "lost": int((per_prompt < -1e-9).sum())}
    return out


def paired_table(comparison: dict, reference: str) -> str:
    lines = [f"| method - {reference} | mean | std over seeds | s.e. over prompts | prompts won / tied / lost |",
             "|---|---:|---:|---:|---:|"]
    for method, d in comparison.items():
        if method != reference:
            lines.append(f"| {method} | {d['mean']:+.4f} | {d['std_over_seeds']:.4f} | {d['se_over_prompts']:.4f} | "
                         f"{d['won']} / {d['tied']} / {d['lost']} |")
    return "\n".join(lines)


def table(results: dict) -> str:
    names = [n for n in next(iter(results.values())) if n != "per_prompt_reward"]
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for method, row in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{row[n]['mean']:.4f} ± {row[n]['std']:.4f}" for n in names) + " |")
    return "\n".join(lines)


def measure_room(bench: Bench, constant: float, test_set: list[str], search_renders: int) -> dict:
    """Each test prompt's per-prompt optimum, searched from the best constant."""
    t0 = time.time()
    optimum = {}
    with Progress(*Progress.get_default_columns(), TimeElapsedColumn(), console=console) as progress:
        for prompt in progress.track(test_set, description=f"per-prompt optimum ({search_renders} renders each)"):
            optimum[prompt] = search.search_coefficients(
                bench.reward, bench.selection(prompt), constant, search_renders)
    return {"optimum": optimum, "seconds": time.time() - t0}


def main(home: Path = typer.Option(Path("benchmarks/.work/graph"), help="Graph home (built if missing)."),
         prompts: int = typer.Option(bases.TEST_PROMPTS, help="Held-out test prompts."),
         train_prompts: int = typer.Option(bases.TRAINING_PROMPTS, help="Training prompts."),
         steps: int = typer.Option(60, help="REINFORCE steps (16 prompts x 4 samples each), or distil epochs."),
         validation_prompts: int = typer.Option(bases.VALIDATION_PROMPTS, help="Prompts on which the best Beta-mean policy is kept."),
         reference_prompts: int = typer.Option(12, help="N_r when the graph is built."),
         rule: str = typer.Option("strengths", help="Merge rule: 'strengths' (the product's default), "
                                  "'anchored' or 'paper' (softmax per kind); see merger.recipe.MergeRule."),
         search_renders: int = typer.Option(search.SEARCH_RENDERS,
                                            help="Renders per prompt for the per-prompt optimum."),
         room_only: bool = typer.Option(False, "--room-only", help="Measure only what needs no trained planner: the "
                                        "headroom (per-prompt optimum - best constant) and the fixed-rule rows."),
         trainer: str = typer.Option("reinforce", help="How every planner of the table is trained: reinforce "
                                     "(planner/train.py, the paper's) or distil (planner/distil.py, onto each "
                                     "training prompt's per-prompt optimum)."),
         target_renders: int = typer.Option(search.SEARCH_RENDERS,
                                            help="distil: renders per training prompt's optimum."),
         targets: Path = typer.Option(None, help="distil: folder keeping the training optima (all.json, year1.json); "
                                      "read when they match, else searched and written."),
         save_planner_to: Path = typer.Option(None, help="Also save the trained planner here."),
         out: Path = typer.Option(Path("benchmarks/results/paper_experiments.json"))) -> None:
    started = time.time()
    if trainer not in ("reinforce", "distil"):
        raise typer.BadParameter(f"unknown trainer {trainer!r}: reinforce or distil", param_hint="--trainer")
    _graph(home, reference_prompts)
    from diffgraph.merger.recipe import RULES

    bench = Bench(home, RULES[rule])
    train_set, valid_set, test_set = prompt_split(prompts, train_prompts, validation_prompts)
    console.print(f"graph: {len(bench.rows)} active experts; {len(train_set)} training, {len(valid_set)} validation, "
                  f"{len(test_set)} test prompts")
    config = {"prompts": prompts, "train_prompts": train_prompts, "steps": steps, "seeds": SEEDS,
              "validation_prompts": validation_prompts, "search_seeds": search.SEARCH_SEEDS,
              "search_renders": search_renders, "rule": rule, "room_only": room_only, "trainer": trainer}
    if trainer == "distil":
        config["target_renders"] = target_renders
    relevance = selection_relevance(bench, test_set)
    console.print(f"ESA on the test prompts: {relevance['selected']} experts selected, {relevance['relevant_share']:.0%} "
                  f"relevant; {relevance['prompts_with_marginal_experts']:.0%} of prompts get a marginal one beside a relevant one")
    report: dict = {"selection_relevance": relevance, "config": config}
    constant, constant_scores = best_constant(bench, valid_set)
    console.print(f"best constant coefficient on validation: {constant} ({constant_scores})")
    year1 = {i for i, r in bench.rows.items() if (r.published_at or "").startswith("2023")}

    def goal(active: set[str] | None, name: str) -> dict | None:
        if trainer != "distil":
            return None
        t0 = time.time()
        optima = training_optima(bench, train_set, constant, target_renders,
                                 None if targets is None else targets / f"{name}.json", active)
        report[f"{name}_targets_seconds"] = time.time() - t0
        return optima

    planner = parameter_planner = parameters = None
    if not room_only:
        all_targets = goal(None, "all")
        t0 = time.time()
        trained = _train(bench, train_set, valid_set, steps, seed=0, targets=all_targets)
        report.update(train_seconds=time.time() - t0, training_history=trained.history, validation=trained.validation)
        planner = trained.planner
        if save_planner_to is not None:
            from diffgraph.planner.checkpoint import save_planner

            save_planner(planner, save_planner_to)
        parameters = parameter_store(bench)
        t0 = time.time()
        by_parameters = _train(bench, train_set, valid_set, steps, seed=0, store=parameters, targets=all_targets)
        parameter_planner = by_parameters.planner
        report.update(parameter_train_seconds=time.time() - t0, validation_parameters=by_parameters.validation,
                      parameter_coefficients=coefficient_spread(bench, parameter_planner, test_set, parameters))
    measured = measure_room(bench, constant, test_set, search_renders)
    results = evaluate(bench, methods(bench, planner, random.Random(0), constant, measured["optimum"],
                                      parameter_planner, parameters), test_set)
    constant_name = next(m for m in results if m.startswith("Best constant"))
    comparisons = {constant_name: paired(results, constant_name)}
    room = comparisons[constant_name][next(m for m in results if m.startswith("Per-prompt optimum"))]["mean"]
    report.update(table1_5=results, paired=comparisons, headroom=room, constant_grid_validation=constant_scores,
                  optimum_coefficients=measured["optimum"], optimum_seconds=measured["seconds"])
    console.print(f"headroom (optimum - best constant): {room:+.4f}")
    scaling = None
    if planner is not None:
        comparisons["DiffGraph VGAE"] = paired(results, "DiffGraph VGAE")
        closed = comparisons[constant_name]["DiffGraph VGAE"]["mean"] / room if room > 0 else float("nan")
        spread = coefficient_spread(bench, planner, test_set)
        console.print(f"the VGAE closes {closed:.0%} of the headroom; its coefficients on the test prompts: mean "
                      f"{spread['mean']:.3f}, range [{spread['min']:.3f}, {spread['max']:.3f}], std within a prompt "
                      f"{spread['mean_std_within_prompt']:.3f}")
        year1_targets = goal(year1, "year1")
        early = _train(bench, train_set, valid_set, steps, seed=0, active=year1, targets=year1_targets)

        def plan_with(model):
            return lambda p: (bench.select(p), model.plan(bench.store, [s["id"] for s in bench.select(p)], p)
                              if bench.select(p) else {})

        scaling = evaluate(bench, {"Planner trained on year 1, year 2 added training-free": plan_with(early.planner),
                                   "Planner trained on year 1 + year 2": plan_with(planner)}, test_set)
        report.update(vgae_share_of_headroom=closed, vgae_coefficients=spread, year1_experts=sorted(year1),
                      validation_year1=early.validation, table2_scaling=scaling)
    report["total_seconds"] = time.time() - started
    write_result(out, report)
    console.print(table(results))
    for reference, comparison in comparisons.items():
        console.print(paired_table(comparison, reference))
    if scaling is not None:
        console.print(table(scaling))
    console.print(f"wrote {out} in {(time.time() - started) / 60:.1f} min")

if __name__ == "__main__":
    typer.run(main)
