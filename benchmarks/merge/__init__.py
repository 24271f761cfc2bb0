"""Full-size merge benchmark: the streaming engine (merger/stream.py) against load-everything-
and-sum and against diffusers' LoRA fusing, on synthetic SD1.5 checkpoints and kohya LoRAs
with the real names and shapes. Run: ``python -m diffgraph.benchmarks.merge`` (see run.py)."""
