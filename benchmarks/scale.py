"""The per-prompt path and the graph commands on a synthetic registry of 100,000 experts.

    python -m diffgraph.benchmarks.scale [--sizes 1000,100000] [--samples 300] [--reference-prompts 12]

For each size, a registry is written into a temporary DIFFGRAPH_HOME through graph_store's own
API (catalog rows, reference prompts, calibration edges, Chroma vectors; no weights): several
base models, both kinds, most experts active and a realistic share pending, failed, rejected
or removed, every calibrated expert with one edge per reference prompt. Description vectors
are real all-MiniLM-L6-v2 embeddings of templated skill descriptions ("watercolor castles
with fog"), each expert its template's vector plus a little noise (cosine ~0.9 to it), so the
HNSW index sees clustered data like a real registry rather than uniform noise; embedding
100k texts one by one would take an hour on this CPU and measure nothing else.

Then, per test prompt (summary and attributes from the offline brain, as the ESA does):
- retrieval: the ESA's Chroma queries, top-K1 checkpoints for the summary and top-K2 LoRAs per
  attribute, in the partitions of the largest base model (the worst case);
- subgraph: graph_store.views.activated_subgraph of what was retrieved;
- VGAE: a freshly initialised planner.model.VGAEPlanner's coefficients on that subgraph
  (featurisation included; a trained one costs the same);
- all three in sequence (the goal: p95 <= 50 ms);
- MiniLM embedding of the summary and attributes, apart (the ESA pays it too).
And once per size: `graph status` (graph_status), export (export_graph), a dry-run reconcile,
the first query after opening the store (index load), and how long building took.

torch runs on one thread; on a shared 2-core machine run it under `nice`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from diffgraph.benchmarks import write_result

console = Console(width=150)

BASES = {"sd15": 0.45, "sdxl": 0.30, "flux1-dev": 0.15, "sd3": 0.10}  # share of experts
KIND_SHARE = {"lora": 0.85, "ckpt": 0.15}
STATUS_SHARE = {"active": 0.90, "pending": 0.04, "failed": 0.03, "rejected": 0.01, "removed": 0.02}
CALIBRATED = ("active", "removed")  # removed experts keep the edges they had
METRICS = ["attr", "miniclip", "quality"]
STYLES = ["watercolor", "oil painting", "pixel art", "anime", "photorealistic", "low poly 3D", "ink sketch",
          "pastel drawing", "cyberpunk neon", "vintage film photo", "art nouveau", "ukiyo-e woodblock", "claymation",
          "isometric", "charcoal drawing", "baroque", "flat vector", "stained glass", "synthwave", "comic book"]
SUBJECTS = ["portraits", "landscapes", "cats", "dogs", "cars", "castles", "food", "flowers", "robots", "spaceships",
            "city streets", "forests", "oceans", "mountains", "birds", "dragons", "interiors", "fashion", "temples",
            "insects"]
ATTRIBUTES = ["soft lighting", "dramatic shadows", "a red color palette", "blue tones", "golden hour light",
              "detailed textures", "a bokeh background", "striped patterns", "snowy weather", "a rainy mood",
              "a white background", "thick outlines", "glowing eyes", "metallic surfaces", "wooden textures",
              "pastel colors", "high contrast", "fog", "a night scene", "a sunset sky"]
REFERENCE_PROMPTS = [f"a {s} of {subj} with {a}" for s, subj, a in zip(STYLES, SUBJECTS[::-1], ATTRIBUTES)]
TEMPLATES = 1500
NOISE = 0.025  # per-dimension std of the noise added to a template's vector: cosine ~0.9


def _percentiles(values: list[float]) -> dict:
    ms = np.asarray(values) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max()), "n": len(values)}


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def _choice(rng: random.Random, shares: dict) -> str:
    return rng.choices(list(shares), weights=list(shares.values()))[0]


class Vocabulary:
    """Template descriptions and test prompts, embedded once with MiniLM for every size."""

    def __init__(self, seed: int, prompts: int):
        from diffgraph.agents import brain
        from diffgraph.text_embedding import embed

        rng = random.Random(seed)
        combos = [(s, subj, a) for s in STYLES for subj in SUBJECTS for a in ATTRIBUTES]
        rng.shuffle(combos)
        self.parts = combos[:TEMPLATES]  # (style, subject, attribute) of each template
        self.templates = [f"{s} {subj} with {a}" for s, subj, a in self.parts]
        self.test_prompts = [f"a {rng.choice(STYLES)} picture of {rng.choice(SUBJECTS)} with "
                             f"{rng.choice(ATTRIBUTES)} and {rng.choice(ATTRIBUTES)}" for _ in range(prompts)]
        self.queries = []  # (prompt, summary, attributes)
        for prompt in self.test_prompts:
            attrs = [a for c in brain.decompose(prompt) for a in c["attributes"]]
            self.queries.append((prompt, brain.summarise(prompt), attrs))
        texts = sorted({*self.templates, *REFERENCE_PROMPTS, *self.test_prompts,
                        *(t for _, s, attrs in self.queries for t in (s, *attrs))})
        t0 = time.perf_counter()
        with console.status(f"embedding {len(texts)} texts with MiniLM"):
            self.vectors = dict(zip(texts, np.asarray(embed(texts), dtype=np.float32)))
        self.embed_seconds = time.perf_counter() - t0
        self.template_matrix = np.stack([self.vectors[t] for t in self.templates])

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vectors[t] for t in texts])


def build_registry(store, size: int, vocab: Vocabulary, reference_prompts: int, seed: int) -> dict:
    """Write ``size`` synthetic experts into ``store``; returns counts and timings."""
    from diffgraph.graph_store.catalog import ExpertRow, utcnow
    from diffgraph.graph_store.records import ExpertFile, check_description

    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    refs = REFERENCE_PROMPTS[:reference_prompts]
    timings = {}
    t0 = time.perf_counter()
    prompt_ids = store.catalog.set_reference_prompts(refs, {t: vocab.vectors[t] for t in refs})
    rows, vectors = [], []
    now = utcnow()
    for i in range(size):
        kind, base, status = _choice(rng, KIND_SHARE), _choice(rng, BASES), _choice(rng, STATUS_SHARE)
        t = rng.randrange(len(vocab.templates))
        template, (style, subject, attribute) = vocab.templates[t], vocab.parts[t]
        text = f"{template}; {kind} for {base}, variant {i}"
        description = check_description({"summary": text, "skills": [template], "styles": [style],
                                         "subjects": [subject], "visual_attributes": [attribute]})
        sha = hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()
        rows.append(ExpertRow(
            id=f"synthetic:{i:07d}", source="synthetic", source_id=f"{i:07d}", version="1", name=f"expert {i}",
            kind=kind, base_model=base, files=[ExpertFile(name=f"e{i}.safetensors", url=f"https://hub.invalid/{i}",
                                                          sha256=sha, size=rng.randrange(10 ** 6, 2 * 10 ** 9))],
            license={"commercial": rng.random() < 0.5}, trigger_words=[f"trg{i}"], tags=[style, kind],
            homepage_url=f"https://hub.invalid/models/{i}", source_description=text, page_sha256=sha,
            description=description, description_text=text, status=status,
            status_reason={"failed": "calibration render failed: out of memory",
                           "rejected": "pickle-only checkpoint"}.get(status), published_at=None,
            created_at=now, updated_at=now, attempts=1 if status == "failed" else 0))
        v = vocab.template_matrix[t] + np_rng.normal(0, NOISE, vocab.template_matrix.shape[1]).astype(np.float32)
        vectors.append(v / np.linalg.norm(v))
    timings["generate_s"] = time.perf_counter() - t0

    batch = 5000
    with _progress() as progress:
        task = progress.add_task(f"catalog rows ({size:,})", total=size)
        t0 = time.perf_counter()
        for start in range(0, size, batch):
            with store.catalog.transaction():
                for row in rows[start:start + batch]:
                    store.catalog.restore_expert(row)
            progress.advance(task, min(batch, size - start))
        timings["catalog_rows_s"] = time.perf_counter() - t0

        calibrated = [r for r in rows if r.status in CALIBRATED]
        edges = len(calibrated) * len(prompt_ids)
        task = progress.add_task(f"calibration edges ({edges:,})", total=edges)
        t0 = time.perf_counter()
        for start in range(0, len(calibrated), batch // 4):
            with store.catalog.transaction():
                for row in calibrated[start:start + batch // 4]:
                    quality = rng.gauss(0, 1)  # an expert's edges share a quality level
                    for pid in prompt_ids:
                        scores = [min(1.0, max(0.0, 0.5 + 0.15 * (quality + rng.gauss(0, 1)))),
                                  0.3 + 0.05 * rng.gauss(0, 1), min(1.0, max(0.0, 0.6 + 0.1 * quality))]
                        store.catalog.put_calibration(row.id, pid, scores, METRICS, seed=rng.randrange(2 ** 31))
                    progress.advance(task, len(prompt_ids))
        timings["calibration_edges_s"] = time.perf_counter() - t0

        task = progress.add_task(f"Chroma vectors ({size:,})", total=size)
        t0 = time.perf_counter()
        for start in range(0, size, batch):
            store.vectors.upsert_many((r.id, v, r.kind, r.base_model, r.status, r.description_text)
                                      for r, v in zip(rows[start:start + batch], vectors[start:start + batch]))
            progress.advance(task, min(batch, size - start))
        timings["chroma_vectors_s"] = time.perf_counter() - t0
    return {"experts": size, "calibration_edges": edges, "reference_prompts": len(prompt_ids), **timings}


def _retrieve(store, base: str, summary_vec, attr_vecs) -> list[str]:
    """The select step's retrieval (tools/select.py), minus the text embedding."""
    from diffgraph.tools.select import K1_CKPT, K2_LORA

    ids = [h[0] for h in store.vectors.query(summary_vec, kind="ckpt", base_model=base, k=K1_CKPT)]
    for vec in attr_vecs:
        ids += [h[0] for h in store.vectors.query(vec, kind="lora", base_model=base, k=K2_LORA)]
    return list(dict.fromkeys(ids))


def measure(store, vocab: Vocabulary, samples: int, warmup: int = 10) -> dict:
    import torch

    from diffgraph.graph_store.views import activated_subgraph
    from diffgraph.planner.features import FeatureSchema
    from diffgraph.planner.model import VGAEPlanner
    from diffgraph.text_embedding import embed

    base = max(BASES, key=BASES.get)
    torch.manual_seed(0)
    planner = VGAEPlanner(FeatureSchema(tuple(METRICS), (0.5, 0.3, 0.6), (0.15, 0.05, 0.1))).eval()
    queries = [(vocab.vectors[p], vocab.vectors[s], vocab.embed(attrs)) for p, s, attrs in vocab.queries]

    t0 = time.perf_counter()
    _retrieve(store, base, *queries[0][1:])
    cold = time.perf_counter() - t0

    times = {k: [] for k in ("retrieval", "subgraph", "vgae", "together")}
    sizes = []
    for n in range(warmup + samples):
        prompt_vec, summary_vec, attr_vecs = queries[n % len(queries)]
        t0 = time.perf_counter()
        ids = _retrieve(store, base, summary_vec, attr_vecs)
        t1 = time.perf_counter()
        data = activated_subgraph(store, ids, prompt_vec, metric_names=METRICS)
        t2 = time.perf_counter()
        planner.coefficients(data)
        t3 = time.perf_counter()
        # and the three again as one unit, on the next prompt (no warm cache from this one)
        prompt_vec, summary_vec, attr_vecs = queries[(n + 1) % len(queries)]
        t4 = time.perf_counter()
        planner.coefficients(activated_subgraph(store, _retrieve(store, base, summary_vec, attr_vecs), prompt_vec,
                                                metric_names=METRICS))
        t5 = time.perf_counter()
        if n >= warmup:
            times["retrieval"].append(t1 - t0)
            times["subgraph"].append(t2 - t1)
            times["vgae"].append(t3 - t2)
            times["together"].append(t5 - t4)
            sizes.append((len(ids), data["reference_prompt"].x.shape[0],
                          data["expert", "calibrated_on", "reference_prompt"].edge_index.shape[1]))
    embed_times = []
    for _, summary, attrs in vocab.queries[:min(50, len(vocab.queries))]:
        t0 = time.perf_counter()
        embed([summary, *attrs])
        embed_times.append(time.perf_counter() - t0)
    return {"base_model": base, "first_query_after_open_ms": cold * 1000,
            **{k: _percentiles(v) for k, v in times.items()}, "embedding": _percentiles(embed_times),
            "subgraph_size": {"experts_mean": statistics.mean(s[0] for s in sizes),
                              "reference_prompts_mean": statistics.mean(s[1] for s in sizes),
                              "edges_mean": statistics.mean(s[2] for s in sizes)}}


def measure_commands(store, home: Path, repeats: int) -> dict:
    from diffgraph.graph_store.export import export_graph
    from diffgraph.graph_store.reconcile import reconcile
    from diffgraph.graph_store.status import graph_status

    status_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        status = graph_status(store)
        status_times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    report = reconcile(store, repair=False)
    reconcile_s = time.perf_counter() - t0
    out = home / "export"
    t0 = time.perf_counter()
    export_graph(store, out)
    export_s = time.perf_counter() - t0
    export_bytes = sum(f.stat().st_size for f in out.iterdir())
    shutil.rmtree(out)
    assert report["clean"], {k: len(v) for k, v in report.items() if isinstance(v, list)}
    # the first call also opens every Chroma partition of this process; later ones do not
    return {"status_first_s": status_times[0], "status": _percentiles(status_times[1:] or status_times),
            "status_failures_listed": len(status["failures"]),
            "reconcile_dry_run_s": reconcile_s, "export_s": export_s, "export_mb": export_bytes / 2 ** 20}


ROWS = [("retrieval (ESA Chroma queries)", "retrieval"), ("activated subgraph", "subgraph"),
        ("VGAE inference", "vgae"), ("retrieval + subgraph + VGAE", "together"),
        ("MiniLM embedding (summary + attributes)", "embedding")]


def table(results: dict) -> Table:
    sizes = sorted(results, key=int)
    small, large = sizes[0], sizes[-1]
    t = Table(title="Scale: per-prompt path and graph commands")
    t.add_column("measurement")
    for s in sizes:
        t.add_column(f"{int(s):,} p50", justify="right")
        t.add_column(f"{int(s):,} p95", justify="right")
    t.add_column(f"p95 ratio {int(large) // int(small)}x", justify="right")
    for label, key in ROWS:
        cells = []
        for s in sizes:
            cells += [f"{results[s]['prompt'][key]['p50_ms']:.1f} ms", f"{results[s]['prompt'][key]['p95_ms']:.1f} ms"]
        ratio = results[large]["prompt"][key]["p95_ms"] / results[small]["prompt"][key]["p95_ms"]
        t.add_row(label, *cells, f"{ratio:.2f}")
    for label, get in (("graph status (first call in a process)", lambda r: r["commands"]["status_first_s"]),
                       ("graph status (p50 of later calls)", lambda r: r["commands"]["status"]["p50_ms"] / 1000),
                       ("export", lambda r: r["commands"]["export_s"]),
                       ("reconcile (dry run)", lambda r: r["commands"]["reconcile_dry_run_s"]),
                       ("first query after open", lambda r: r["prompt"]["first_query_after_open_ms"] / 1000)):
        cells = []
        for s in sizes:
            cells += [f"{get(results[s]):.3f} s", ""]
        t.add_row(label, *cells, f"{get(results[large]) / get(results[small]):.1f}")
    return t


def markdown(results: dict) -> str:
    """The table of ``table`` as Markdown, for benchmarks/RESULTS.md."""
    sizes = sorted(results, key=int)
    small, large = sizes[0], sizes[-1]
    head = " | ".join(f"{int(s):,} p50 | {int(s):,} p95" for s in sizes)
    lines = [f"| measurement | {head} | p95 ratio |", "|---|" + "---:|" * (2 * len(sizes) + 1)]
    for label, key in ROWS:
        cells = " | ".join(f"{results[s]['prompt'][key]['p50_ms']:.1f} ms | "
                           f"{results[s]['prompt'][key]['p95_ms']:.1f} ms" for s in sizes)
        ratio = results[large]["prompt"][key]["p95_ms"] / results[small]["prompt"][key]["p95_ms"]
        lines.append(f"| {label} | {cells} | {ratio:.2f} |")
    for label, get in (("graph status (first call in a process)", lambda r: r["commands"]["status_first_s"]),
                       ("graph status (p50 of later calls)", lambda r: r["commands"]["status"]["p50_ms"] / 1000),
                       ("export", lambda r: r["commands"]["export_s"]),
                       ("reconcile (dry run)", lambda r: r["commands"]["reconcile_dry_run_s"]),
                       ("first query after open", lambda r: r["prompt"]["first_query_after_open_ms"] / 1000)):
        cells = " | ".join(f"{get(results[s]):.3f} s | " for s in sizes)
        lines.append(f"| {label} | {cells} | {get(results[large]) / get(results[small]):.1f} |")
    return "\n".join(lines)


def main(sizes: str = typer.Option("1000,100000", help="registry sizes, comma-separated"),
         samples: int = typer.Option(300, help="timed prompts per size"),
         reference_prompts: int = typer.Option(12, help="N_r: calibration edges per calibrated expert"),
         status_repeats: int = typer.Option(5, help="timed `graph status` calls per size"),
         seed: int = typer.Option(0),
         out: Path = typer.Option(Path("benchmarks/results/scale.json")),
         keep: Path = typer.Option(None, help="build the registries here and keep them (default: a temp dir)"),
         db_url: str = typer.Option(None, help="a PostgreSQL catalog (an empty database; one size per run)"),
         chroma_url: str = typer.Option(None, help="a Chroma server (empty; one size per run)")) -> None:
    import torch

    from diffgraph.graph_store.store import GraphStore

    torch.set_num_threads(1)
    if (db_url or chroma_url) and "," in sizes:
        raise typer.BadParameter("with --db-url or --chroma-url give one size per run (each needs an empty store)")
    vocab = Vocabulary(seed, prompts=max(60, min(samples, 200)))
    results: dict = {}
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="diffgraph-scale-"))
    try:
        for size in (int(s) for s in sizes.split(",")):
            home = root / f"home_{size}"
            os.environ["DIFFGRAPH_HOME"] = str(home)  # the registry lives in its own DIFFGRAPH_HOME
            console.rule(f"{size:,} experts in {home}")
            record = home / "scale_build.json"  # a kept registry (--keep) is measured again, not rebuilt
            if keep and record.exists() and not (db_url or chroma_url):
                built = json.loads(record.read_text())
                console.print(f"reusing the registry built in {home}")
            else:
                with GraphStore.open(home, db_url=db_url, chroma_url=chroma_url) as store:
                    if store.catalog.expert_counts() or store.vectors.count():
                        raise typer.BadParameter(f"the store at {home} / --db-url / --chroma-url is not empty")
                    store.embed = vocab.embed
                    built = build_registry(store, size, vocab, reference_prompts, seed)
                home.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps(built))
            console.print(built)
            # measured on a freshly opened store, as a server process would see it
            with GraphStore.open(home, db_url=db_url, chroma_url=chroma_url) as store:
                store.embed = vocab.embed
                prompt = measure(store, vocab, samples)
                commands = measure_commands(store, home, status_repeats)
            results[str(size)] = {"build": built, "prompt": prompt, "commands": commands}
            console.print({k: prompt[k] for k in ("first_query_after_open_ms", "subgraph_size")}, commands)
            if not keep:
                shutil.rmtree(home, ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    console.print(table(results))
    print(markdown(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m diffgraph.benchmarks.scale", "sizes": sizes,
            "catalog": "postgresql" if db_url else "sqlite", "chroma": "server" if chroma_url else "embedded",
            "samples": samples,
            "reference_prompts": reference_prompts, "seed": seed, "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": 1, "minilm_embed_vocabulary_s": vocab.embed_seconds}
    write_result(out, {"meta": meta, "results": results})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
