"""The planner tool: merging coefficients for the selected experts of a prompt.

It uses the VGAE checkpoint trained for the base model (DIFFGRAPH_HOME/planner/<base>/) when
there is one. Without one, each LoRA gets the coefficient of its recommended weight (the
"preferred weight" its user or publisher gave, under the default merge rule) and every other
expert an equal 0.5; it always says which it used.
"""

from __future__ import annotations

from pathlib import Path

from diffgraph.graph_store.store import GraphStore
from diffgraph.merger.recipe import STRENGTHS
from diffgraph.planner.checkpoint import load_planner

from . import bases


def planner_dir(home: Path, base_model: str) -> Path:
    return home / "planner" / base_model


class Planner:
    """Coefficients for picks: the trained VGAE's Beta means, or recommended weights / equal."""

    def __init__(self, store: GraphStore, model=None, name: str = "recommended weights, else equal (no trained planner)"):
        self.store, self.model, self.name = store, model, name

    @classmethod
    def for_home(cls, home: Path, store: GraphStore, base_model: str) -> "Planner":
        """The home's own trained planner, else the one shipped for the base, else equal weights."""

        directory = planner_dir(home, base_model)
        if not (directory / "planner.json").exists():
            shipped = bases.BASES.get(base_model).default_planner() if base_model in bases.BASES else None
            if shipped is None:
                return cls(store)
            directory = shipped

        return cls(store, load_planner(directory), f"VGAE ({directory})")

    def plan(self, prompt: str, picks: list[dict]) -> dict[str, float]:
        ids = [p["id"] for p in picks]
        if not ids:
            return {}
        if self.model is None:
            return {i: self._fallback(i) for i in ids}
        return self.model.plan(self.store, ids, prompt)

    def _fallback(self, expert_id: str) -> float:
        row = self.store.catalog.get(expert_id)
        recommended = row.preferred_weight if row is not None and row.kind == "lora" else None
        coefficient = STRENGTHS.lora_coefficient(recommended) if recommended is not None else None
        return 0.5 if coefficient is None else coefficient
