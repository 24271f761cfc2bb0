"""The parameter-based baseline of benchmarks/paper_experiments.py (the paper's Table 5 variant):
the VGAE reads each expert's node features from its weights, not from its homepage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffgraph.benchmarks.paper_experiments import Bench, ParameterVectors, weight_delta
from diffgraph.graph_store.views import activated_subgraph
from diffgraph.merger.recipe import RULES


@pytest.fixture(scope="module")
def bench(graph_home):
    return Bench(graph_home, RULES["strengths"])


def test_parameter_features_keep_the_angles_between_weight_deltas(bench):
    loras = sorted(i for i, r in bench.rows.items() if r.kind == "lora")[:4]
    ckpts = sorted(i for i, r in bench.rows.items() if r.kind == "ckpt")[:2]
    rows = {i: bench.rows[i] for i in loras + ckpts}
    ids = sorted(rows)
    vectors = ParameterVectors(bench.engine, rows, dim=384)
    x = vectors.get_embeddings(ids, None)
    assert x.shape == (len(ids), 384) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    deltas = torch.stack([weight_delta(bench.engine, rows[i]) for i in ids])
    assert (deltas != 0).any(dim=1).all(), "every expert changes some of the base's weights"
    raw = torch.nn.functional.normalize(deltas, dim=1)
    # Johnson-Lindenstrauss at 384 dimensions: cosines are kept to within a few tenths at worst
    assert np.abs(x @ x.T - (raw @ raw.T).numpy()).max() < 0.3
    again = ParameterVectors(bench.engine, rows, dim=384).get_embeddings(ids[::-1], None)
    assert np.array_equal(again, x[::-1]), "the projection is fixed: the same weights give the same features"
    assert vectors.get_embeddings([], None).shape == (0, 384)


def test_the_planner_view_carries_parameter_features_not_descriptions(bench):
    from dataclasses import replace

    ids = sorted(bench.rows)[:3]
    vectors = ParameterVectors(bench.engine, {i: bench.rows[i] for i in ids}, dim=384)
    store = replace(bench.store, vectors=vectors)
    view = activated_subgraph(store, ids, "a red circle on a white background")
    described = activated_subgraph(bench.store, ids, "a red circle on a white background")
    assert np.array_equal(view["expert"].x.numpy(), vectors.get_embeddings(ids, None))
    assert not np.allclose(view["expert"].x.numpy(), described["expert"].x.numpy())
    # everything else the planner sees is the graph's own: prompt, references, calibration edges
    assert torch.equal(view["user_prompt"].x, described["user_prompt"].x)
    edges = ("expert", "calibrated_on", "reference_prompt")
    assert torch.equal(view[edges].edge_attr, described[edges].edge_attr)


def test_selection_relevance_counts_what_the_prompt_did_not_ask_for(bench):
    """Ground truth from the experts' specs, on selections set by hand: polka dots beside the
    stripes a prompt asked for is marginal; teal and mint for a teal-on-mint prompt are not;
    the harmful enhancer (no skill) never is."""
    from diffgraph.benchmarks.paper_experiments import expert_specs, selection_relevance

    by_slug = {spec.slug: expert_id for expert_id, spec in expert_specs(bench).items()}
    selections = {
        "a red circle on a striped white background": ["stripes-pro", "polka-dots"],
        "a teal diamond on a mint background": ["teal-tone", "mint-backdrop"],
        "a blue square on a gray background": ["ultra-detail"],
    }
    for prompt, slugs in selections.items():
        bench._selection[prompt] = [{"id": by_slug[slug]} for slug in slugs]
    try:
        measured = selection_relevance(bench, list(selections))
    finally:
        for prompt in selections:
            del bench._selection[prompt]
    assert measured == {"selected": 5, "relevant_share": pytest.approx(3 / 5),
                        "prompts_with_marginal_experts": pytest.approx(1 / 3)}


def test_training_optima_are_kept_and_never_reused_for_another_selection(bench, tmp_path):
    """The distil trainer's targets: one optimum per prompt over exactly its selected experts,
    read back without a render, and refused (file untouched) for another budget or selection."""
    import json

    import typer

    from diffgraph.benchmarks.paper_experiments import training_optima

    prompts = ["a magenta box shape on a navy background, outlined", "a teal square on a white background"]
    selected = {p: sorted(s["id"] for s in bench.select(p)) for p in prompts if bench.select(p)}
    assert selected, "the mini world's ESA selects experts for these prompts"
    path = tmp_path / "all.json"
    first = training_optima(bench, prompts, 0.25, 4, path)
    assert {p: sorted(plan) for p, plan in first.items()} == selected
    assert all(0.0 <= c <= 1.0 for plan in first.values() for c in plan.values())
    renders = []
    score = bench.score
    bench.score = lambda *args, **kwargs: renders.append(args) or score(*args, **kwargs)
    try:
        assert training_optima(bench, prompts, 0.25, 4, path) == first
    finally:
        del bench.score
    assert not renders, "kept optima are read, not searched again"
    dropped = next(iter(next(iter(selected.values()))))
    active = {i for ids in selected.values() for i in ids} - {dropped}
    for renders_, active_ in ((8, None), (4, active)):
        with pytest.raises(typer.BadParameter, match="other prompts, experts or budget"):
            training_optima(bench, prompts, 0.25, renders_, path, active_)
    assert json.loads(path.read_text())["optima"] == first
