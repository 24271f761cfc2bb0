"""The universal graph: experts as nodes, calibration scores as edges.

- records: the typed values sources yield (ExpertRecord, ExpertFile) and the description schema
- catalog: SQLite, the source of truth (experts, reference prompts, calibration, runs)
- vectors: Chroma, description embeddings partitioned by (base model, kind)
- store: GraphStore, both opened together; writes catalog first, then Chroma
- reconcile: finds and repairs drift between the two
- views: the activated subgraph of a user prompt as a torch_geometric HeteroData
- export: the paper's COO + .npz + JSON manifest format, byte-exact round trip
- status: counts and failures for `diffgraph graph status`

Nothing is imported here, so that reading a record does not load Chroma or torch.
"""
