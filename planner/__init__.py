"""The merging planner (paper Sec. 3.2-3.3): how much of each selected expert to use.

- features: the activated subgraph (graph_store's view) as one graph with typed node and
  edge features, and the FeatureSchema a checkpoint records;
- model: VGAEPlanner, a TransformerConv VGAE encoder and a Beta head per expert;
- train: REINFORCE on a reward callback, with a leave-one-out baseline;
- checkpoint: safetensors weights + a JSON schema of the graph they were trained on.
"""

from .checkpoint import load_planner, save_planner
from .features import FeatureSchema, SchemaMismatch, activated_view, featurise
from .model import PlannerOutput, VGAEPlanner
from .train import TrainConfig, TrainResult, train

__all__ = ["FeatureSchema", "PlannerOutput", "SchemaMismatch", "TrainConfig", "TrainResult", "VGAEPlanner",
           "activated_view", "featurise", "load_planner", "save_planner", "train"]
