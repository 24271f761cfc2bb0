"""The merging planner (paper Sec. 3.2-3.3): how much of each selected expert to use.

- features: the activated subgraph (graph_store's view) as one graph with typed node and
  edge features, and the FeatureSchema a checkpoint records;
- model: VGAEPlanner, a TransformerConv VGAE encoder and a Beta head per expert;
- train: REINFORCE on a reward callback, with a leave-one-out baseline;
- checkpoint: safetensors weights + a JSON schema of the graph they were trained on.

Nothing is imported here (as in graph_store), so ``diffgraph.planner.train`` stays the
module and importing the package loads no torch.
"""
