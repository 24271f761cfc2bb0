"""Time per expert of the Graph Construction Agent's stages in the mini world.

    python -m diffgraph.benchmarks.gca_timing [--reference-prompts 12]

Registration (download and verify, read the homepage in Chromium, describe with the offline
brain, embed and store) is timed apart from calibration (render every reference prompt with
the expert and score the images). The paper's figure for the real thing: 1.2 minutes per
expert on A100s for both together.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import typer
from rich.console import Console

from diffgraph.benchmarks import write_result

console = Console()


def main(reference_prompts: int = typer.Option(12, help="N_r"),
         out: Path = typer.Option(Path("benchmarks/results/gca_timing.json"))) -> None:
    from diffgraph.agents.describe import describe
    from diffgraph.graph_store.store import GraphStore
    from diffgraph.text_embedding import embed
    from diffgraph.tools import bases
    from diffgraph.tools.browser import HomepageReader
    from diffgraph.tools.calibrate import calibrate, select_reference_prompts
    from diffgraph.tools.sources import ContentStore, open_sources

    base = "miniworld-sd"
    engine, suite = bases.engine_for(base), bases.suite_for(base)
    refs = select_reference_prompts(bases.profile(base).reference_candidates(300), reference_prompts, embed)
    register_s, calibrate_s = [], []
    with tempfile.TemporaryDirectory() as tmp, open_sources("miniworld") as sources, \
            GraphStore.open(Path(tmp)) as store:
        cas = ContentStore(Path(tmp))
        url = urlparse(sources[0].base_url)
        with HomepageReader({f"{url.hostname}:{url.port}"}) as reader:
            for source in sources:
                for record in source.iter_models():
                    t0 = time.perf_counter()
                    path = source.download(record.files[0], cas)
                    page = reader.read(record.homepage_url)
                    store.upsert_expert(record)
                    reg = describe(record, page)
                    store.register(record.id, reg.description, reg.text, page.text_sha256)
                    t1 = time.perf_counter()
                    calibrate(engine, suite, base, record.kind, record.id, path, record.files[0].sha256, refs)
                    t2 = time.perf_counter()
                    register_s.append(t1 - t0)
                    calibrate_s.append(t2 - t1)
                    console.print(f"{record.id:32} register {t1 - t0:5.2f} s  calibrate {t2 - t1:5.2f} s")
    result = {"experts": len(register_s), "reference_prompts": reference_prompts,
              "register_s": {"mean": statistics.mean(register_s), "median": statistics.median(register_s),
                             "max": max(register_s)},
              "calibrate_s": {"mean": statistics.mean(calibrate_s), "median": statistics.median(calibrate_s),
                              "max": max(calibrate_s)}}
    write_result(out, result)
    console.print(result)


if __name__ == "__main__":
    typer.run(main)
