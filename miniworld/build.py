"""`diffgraph miniworld build`: train the whole mini world from seeds.

Stages: VAE -> base (UNet + text encoder), scorers and damage judge (all need only the VAE) -> one job per
expert (each needs the base). Every job runs in a worker process with one torch thread, and
starts from its own seeded random stream and from the float16 files the earlier stages saved,
so the artifacts' bits depend on the seed and the code, not on how many cores or workers the
machine has; more workers only finish sooner. (One 2-thread process kept a 2-core machine
about 60% busy: rendering, captioning and optimiser steps are single-threaded, and
OMP_WAIT_POLICY=PASSIVE, which the package sets for shared machines, doubled the step time.)
`--only-scorers` / `--only-experts` rerun one stage of an existing build exactly as a full
build would. Everything lands in one artifacts folder with a manifest of sha256 hashes; the
committed copy under miniworld/artifacts is what tests and the demo load, so nothing retrains
at run time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import domain, lora_files, models, scorers, training
from .artifacts_io import ARTIFACTS
from .experts import EXPERTS, ExpertSpec, by_slug

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class BuildConfig:
    seed: int = 1234
    vae_steps: int = 1500
    base_steps: int = 4000
    base_scenes: int = 30000
    expert_scenes: int = 3000
    expert_step_scale: float = 0.75
    scorer_steps: int = 1600
    damage_steps: int = 2000
    # Per rare shape, colour or background value: ~90 of 30,000 base scenes (textures ~30, lighting
    # ~45 each, see domain.sample_attrs). At 0.01 the base still drew purple, teal, navy, mint and
    # "at night" 97-100% right, and the experts for those skills had nothing left to add.
    rare_rate: float = 0.003
    batch: int = 64
    expert_batch: int = 32

    @classmethod
    def quick(cls) -> "BuildConfig":
        """A smoke-test build (minutes, poor quality): exercises every step."""
        return cls(vae_steps=30, base_steps=30, base_scenes=600, expert_scenes=200, expert_step_scale=0.05,
                   scorer_steps=30, damage_steps=20, batch=16, expert_batch=16)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


def _scene_batch(rng: random.Random, batch: int) -> list:
    """Half uniform scenes (every value equally known) and half in-the-wild ones: uniform
    scenes alone are almost never plain, evenly lit and unstyled, and a judge that rarely saw
    such scenes called the base's gray and beige backgrounds white."""
    return [domain.sample_scene(rng, uniform=i % 2 == 0) for i in range(batch)]


def _judge_view(x: torch.Tensor, vae, through_vae: bool, gen: torch.Generator) -> torch.Tensor:
    """Images as a judge should learn them: through the VAE for half the batches, as generated
    images are, with a small colour jitter so labels do not hang on exact pixel values the
    generator never hits, and a little noise."""
    if through_vae:
        with torch.no_grad():
            x = vae.decode(vae.encode(x).latent_dist.sample()).sample.clamp(-1, 1)
    n = x.shape[0]
    gain = 1 + 0.1 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    shift = 0.1 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    return (x * gain + shift + 0.03 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def _save_nets(out: Path, nets: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name, model in nets.items():
        save_file({k: v.contiguous() for k, v in model.eval().state_dict().items()}, str(out / f"{name}.safetensors"))


def _train_scorers(vae, cfg: BuildConfig, rng: random.Random, progress, out: Path) -> None:
    """Train the attribute classifier and MiniClip (see _scene_batch and _judge_view)."""
    from diffgraph.text_embedding import embed

    net, clip = scorers.AttributeNet(), scorers.MiniClip()
    opt = torch.optim.AdamW([*net.parameters(), *clip.parameters()], lr=2e-3)
    task = progress.add_task("scorers", total=cfg.scorer_steps)
    batch = cfg.batch
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for step in range(cfg.scorer_steps):
        scenes = _scene_batch(rng, batch)
        x = _judge_view(training.render_batch(scenes), vae, step % 2 == 1, gen)
        logits = net(x)
        loss = sum(F.cross_entropy(logits[a], torch.tensor([domain.ATTRIBUTES[a].index(s.attrs[a]) for s in scenes]))
                   for a in domain.ATTRIBUTES)
        texts = [domain.caption(s.attrs, rng) for s in scenes]
        img_e, txt_e = clip(x, torch.as_tensor(embed(texts)))
        sim = img_e @ txt_e.T * clip.logit_scale.exp()
        labels = torch.arange(batch)
        loss = loss + (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress.update(task, advance=1, description=f"scorers loss {loss.item():.3f}")
    _save_nets(out, {"attribute_net": net, "miniclip": clip})
    scorers.save_config(out)


def _train_damage_judge(vae, cfg: BuildConfig, rng: random.Random, progress, out: Path) -> None:
    """Train the damage judge: each image clean (target 0) and burnt (training.burn) at a
    random severity (target the severity)."""
    judge = scorers.DamageNet()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    task = progress.add_task("damage judge", total=cfg.damage_steps)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    for step in range(cfg.damage_steps):
        x = _judge_view(training.render_batch(_scene_batch(rng, cfg.batch)), vae, step % 2 == 1, gen)
        severity = 0.1 + 0.9 * torch.rand(cfg.batch, generator=gen)
        logits = judge(torch.cat([x, training.burn(vae, x, severity, gen)]))
        loss = F.binary_cross_entropy_with_logits(logits, torch.cat([torch.zeros(cfg.batch), severity]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress.update(task, advance=1, description=f"damage judge loss {loss.item():.3f}")
    _save_nets(out, {"damage_net": judge})


def _expert_data(spec: ExpertSpec, vae, cfg: BuildConfig, rng: random.Random) -> training.LatentSet:
    n = cfg.expert_scenes
    scenes = []
    for _ in range(n):
        force = spec.skill if (spec.skill and rng.random() < spec.skill_share) else None
        scenes.append(domain.sample_scene(rng, rare_rate=cfg.rare_rate, force=force))
    corrupt = random.Random(rng.randrange(2**31)) if spec.corrupt else None
    return training.LatentSet(scenes, training.encode_scenes(vae, scenes, corrupt))


def _bake(models_: tuple, factor: float) -> None:
    """Scale each LoRA's up-projection (lora_B / kohya lora_up) by ``factor``: the published file
    then acts at weight 1 / factor as the trained adapter did at weight 1 (ExpertSpec.bake)."""
    with torch.no_grad():
        for model in models_:
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(factor)


def _train_lora(spec, base, tokenizer, scheduler, data, cfg, rng, progress, out_dir: Path) -> Path:
    from peft import LoraConfig

    unet, te = copy.deepcopy(base["unet"]), copy.deepcopy(base["text_encoder"])
    unet_cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS)
    te_cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian", target_modules=TE_LORA_TARGETS)
    unet.add_adapter(unet_cfg)
    te.add_adapter(te_cfg)
    params = [p for m in (unet, te) for n, p in m.named_parameters() if "lora_" in n]
    for m in (unet, te):
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
    steps = max(5, int(spec.steps * cfg.expert_step_scale))
    training.train_denoiser(unet=unet, text_encoder=te, tokenizer=tokenizer, scheduler=scheduler, data=data,
                            params=params, steps=steps, lr=2e-3, batch=cfg.expert_batch, rng=rng,
                            progress=progress, label=f"lora {spec.slug}")
    _bake((unet, te), spec.bake)
    path = out_dir / f"{spec.slug}.safetensors"
    if spec.file_format == "kohya":
        lora_files.save_kohya_lora(path, unet, te, spec.alpha, {"ss_network_dim": spec.rank, "ss_network_alpha": spec.alpha,
                                                                "ss_base_model_version": "miniworld-sd"})
    else:
        lora_files.save_diffusers_lora(path, unet, te, unet_cfg, te_cfg)
    return path


def _train_ckpt(spec, base, tokenizer, scheduler, data, cfg, rng, progress, out_dir: Path) -> Path:
    unet, te = copy.deepcopy(base["unet"]), copy.deepcopy(base["text_encoder"])
    params = list(unet.parameters()) + list(te.parameters())
    steps = max(5, int(spec.steps * cfg.expert_step_scale))
    training.train_denoiser(unet=unet, text_encoder=te, tokenizer=tokenizer, scheduler=scheduler, data=data,
                            params=params, steps=steps, lr=3e-4, batch=cfg.expert_batch, rng=rng,
                            progress=progress, label=f"ckpt {spec.slug}")
    path = out_dir / f"{spec.slug}.safetensors"
    lora_files.save_single_file(path, unet, base["vae"], te, {"base_model": "miniworld-sd", "title": spec.title})
    return path


def _save_base(base: dict, tokenizer, out: Path) -> None:
    """A diffusers folder in float16, with the tokenizer as vocab.json + merges.txt (small)."""
    pipe = models.assemble_pipeline(base["unet"], base["vae"], base["text_encoder"], tokenizer)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tok_dir = out / "tokenizer"
    shutil.rmtree(tok_dir)
    models.clip_bpe_files(tok_dir)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": models.MAX_TOKENS,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}, indent=1))


def _load_base(directory: Path) -> tuple[dict, object]:
    """The saved (float16) base, back in float32: experts always start from exactly what ships."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    pipe = models.load_base_pipeline(directory)
    base = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
            "scheduler": DDPMScheduler(**models.SCHEDULER_CONFIG, clip_sample=False)}
    return base, CLIPTokenizer.from_pretrained(str(directory / "tokenizer"))


def _load_vae(directory: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True).eval()


def stage_rng(cfg: BuildConfig, stage: str) -> random.Random:
    """Each stage draws from its own seeded stream (and seeds torch from it), so a stage can be
    rebuilt alone and come out as it would in a full build."""
    digest = hashlib.sha256(f"{cfg.seed}:{stage}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:4], "little"))
    return random.Random(digest)


# ---- jobs: each runs in a worker process and reads its inputs from the files of earlier stages


def _vae_job(cfg: BuildConfig, vae_dir: Path) -> None:
    vae = models.new_components(cfg.seed)["vae"]
    rng = stage_rng(cfg, "vae")
    training.train_vae(vae, cfg.vae_steps, cfg.batch, rng, _PROGRESS)
    probe = training.render_batch([domain.sample_scene(rng, uniform=True) for _ in range(512)])
    with torch.no_grad():
        std = vae.encode(probe).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.to(torch.float16).save_pretrained(vae_dir, safe_serialization=True)


def _base_job(cfg: BuildConfig, vae_dir: Path, out: Path) -> None:
    tokenizer = models.build_tokenizer(out.with_name("_tok"))
    shutil.rmtree(out.with_name("_tok"))
    base = models.new_components(cfg.seed)
    base["vae"] = _load_vae(vae_dir)
    rng = stage_rng(cfg, "base")
    scenes = [domain.sample_scene(rng, rare_rate=cfg.rare_rate) for _ in range(cfg.base_scenes)]
    data = training.LatentSet(scenes, training.encode_scenes(base["vae"], scenes))
    params = list(base["unet"].parameters()) + list(base["text_encoder"].parameters())
    training.train_denoiser(unet=base["unet"], text_encoder=base["text_encoder"], tokenizer=tokenizer,
                            scheduler=base["scheduler"], data=data, params=params, steps=cfg.base_steps,
                            lr=2e-3, batch=cfg.batch, rng=rng, progress=_PROGRESS, label="base")
    _save_base(base, tokenizer, out)


def _scorers_job(cfg: BuildConfig, vae_dir: Path, out: Path) -> None:
    _train_scorers(_load_vae(vae_dir), cfg, stage_rng(cfg, "scorers"), _PROGRESS, out)


def _damage_job(cfg: BuildConfig, vae_dir: Path, out: Path) -> None:
    _train_damage_judge(_load_vae(vae_dir), cfg, stage_rng(cfg, "damage"), _PROGRESS, out)


def _expert_job(cfg: BuildConfig, slug: str, base_dir: Path, out_dir: Path) -> dict:
    """One expert from the saved base, from its own seeded stream; its manifest entry."""
    spec = by_slug(slug)
    base, tokenizer = _load_base(base_dir)
    rng = stage_rng(cfg, f"expert:{slug}")
    data = _expert_data(spec, base["vae"], cfg, rng)
    train = _train_lora if spec.kind == "lora" else _train_ckpt
    path = train(spec, base, tokenizer, base["scheduler"], data, cfg, rng, _PROGRESS, out_dir)
    return {"slug": slug, "kind": spec.kind, "format": spec.file_format,
            "file": f"experts/{path.name}", "sha256": sha256_file(path), "bytes": path.stat().st_size}


# ---- the worker pool and its progress bars


class _QueueProgress:
    """The part of rich's Progress the training loops use, forwarded to the parent's bars."""

    def __init__(self, queue):
        self.queue, self.count = queue, 0

    def add_task(self, description: str, total: float | None = None, **_) -> tuple:
        self.count += 1
        task = (os.getpid(), self.count)
        self.queue.put(("add", task, {"description": description, "total": total}))
        return task

    def update(self, task: tuple, **fields) -> None:
        self.queue.put(("update", task, fields))


_PROGRESS: _QueueProgress | None = None  # set in each worker process


def _init_worker(queue) -> None:
    # One thread per worker: the bits then do not depend on the core count, and no OpenMP
    # thread waits (passive or spinning) on another process's core.
    global _PROGRESS
    torch.set_num_threads(1)
    _PROGRESS = _QueueProgress(queue)


class _Pool:
    """Worker processes (spawned, one torch thread each) whose progress shows in one rich display."""

    def __init__(self, workers: int, progress: Progress):
        context = multiprocessing.get_context("spawn")
        self.queue = context.Queue()
        self.progress, self.tasks = progress, {}
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                            initializer=_init_worker, initargs=(self.queue,))
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()

    def _drain(self) -> None:
        while (message := self.queue.get()) is not None:
            kind, task, fields = message
            if kind == "add":
                self.tasks[task] = self.progress.add_task(fields["description"], total=fields["total"])
            elif task in self.tasks:
                self.progress.update(self.tasks[task], **fields)

    def submit(self, fn, *args) -> Future:
        return self.executor.submit(fn, *args)

    def __enter__(self) -> "_Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.executor.shutdown(cancel_futures=exc[0] is not None)
        self.queue.put(None)
        self.drain.join()


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _timed(future: Future, started: float, timings: dict, key: str) -> Future:
    """Record in ``timings[key]`` when the job finished (not when someone waited for it)."""
    future.add_done_callback(lambda _: timings.__setitem__(key, time.time() - started))
    return future


def _run_experts(pool: _Pool, cfg: BuildConfig, base_dir: Path, out_dir: Path) -> list:
    """Longest jobs first, so the last worker to finish is not left with a long one."""
    specs = sorted(EXPERTS, key=lambda s: -s.steps)
    return [pool.submit(_expert_job, cfg, spec.slug, base_dir, out_dir) for spec in specs]


def _manifest_entries(futures: list) -> list[dict]:
    entries = {entry["slug"]: entry for entry in (f.result() for f in futures)}
    return [entries[spec.slug] for spec in EXPERTS]


def build(out: Path = ARTIFACTS, cfg: BuildConfig | None = None, console: Console | None = None,
          workers: int | None = None) -> dict:
    """Rebuild every artifact into ``out`` (replacing it) and return the build report."""
    cfg = cfg or BuildConfig()
    console = console or Console()
    workers = workers or default_workers()
    started = time.time()
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "experts").mkdir(parents=True)
    vae_dir = tmp / "_vae"
    timings: dict = {}
    with _progress() as progress, _Pool(workers, progress) as pool:
        _timed(pool.submit(_vae_job, cfg, vae_dir), started, timings, "vae_done_s").result()
        base = _timed(pool.submit(_base_job, cfg, vae_dir, tmp / "base"), started, timings, "base_done_s")
        scorers = _timed(pool.submit(_scorers_job, cfg, vae_dir, tmp / "scorers"), started, timings, "scorers_done_s")
        damage = _timed(pool.submit(_damage_job, cfg, vae_dir, tmp / "scorers"), started, timings, "damage_done_s")
        base.result()
        experts = _run_experts(pool, cfg, tmp / "base", tmp / "experts")
        scorers.result()
        damage.result()
        entries = _manifest_entries(experts)
    timings["total_s"] = time.time() - started
    shutil.rmtree(vae_dir)
    manifest = {"base_model": "miniworld-sd", "base": "base", "scorers": "scorers", "experts": entries,
                "build": {"config": asdict(cfg), "workers": workers, "timings": timings, "torch": torch.__version__}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    console.print(f"[green]mini world built in {timings['total_s'] / 60:.1f} min with {workers} workers -> {out}")
    return manifest


def _update_manifest(out: Path, cfg: BuildConfig, changes: dict, timing_key: str, seconds: float) -> dict:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {
        "base_model": "miniworld-sd", "base": "base", "scorers": "scorers", "build": {"timings": {}}}
    manifest.update(changes)
    manifest["build"]["config"] = asdict(cfg)
    manifest["build"]["timings"][timing_key] = seconds
    manifest["build"]["torch"] = torch.__version__
    path.write_text(json.dumps(manifest, indent=1))
    return manifest


def rebuild_experts(out: Path = ARTIFACTS, cfg: BuildConfig | None = None, console: Console | None = None,
                    workers: int | None = None) -> dict:
    """Retrain only the experts, from the base of an existing build, as a full build would."""
    cfg = cfg or BuildConfig()
    console = console or Console()
    started = time.time()
    tmp = out / "experts.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with _progress() as progress, _Pool(workers or default_workers(), progress) as pool:
        entries = _manifest_entries(_run_experts(pool, cfg, out / "base", tmp))
    shutil.rmtree(out / "experts", ignore_errors=True)
    tmp.rename(out / "experts")
    manifest = _update_manifest(out, cfg, {"experts": entries}, "experts_rebuilt_s", time.time() - started)
    console.print(f"[green]experts retrained in {(time.time() - started) / 60:.1f} min -> {out / 'experts'}")
    return manifest


def rebuild_scorers(out: Path = ARTIFACTS, cfg: BuildConfig | None = None, console: Console | None = None) -> dict:
    """Retrain only the scorers and the damage judge of an existing build (with that build's
    VAE), as a full build would train them (two jobs side by side), and record it in the manifest."""
    cfg = cfg or BuildConfig()
    console = console or Console()
    started = time.time()
    tmp = out / "scorers.building"
    shutil.rmtree(tmp, ignore_errors=True)
    with _progress() as progress, _Pool(2, progress) as pool:
        jobs = [pool.submit(job, cfg, out / "base" / "vae", tmp) for job in (_scorers_job, _damage_job)]
        for job in jobs:
            job.result()
    shutil.rmtree(out / "scorers", ignore_errors=True)
    tmp.rename(out / "scorers")
    manifest = _update_manifest(out, cfg, {}, "scorers_rebuilt_s", time.time() - started)
    console.print(f"[green]scorers retrained in {(time.time() - started) / 60:.1f} min -> {out / 'scorers'}")
    return manifest


def artifact_bytes(root: Path = ARTIFACTS) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
