"""Where the real metrics' weights live, and how they are read without trusting pickles.

Nothing here downloads. A metric's files are looked up, in order, in

1. ``weights_dir`` (the ``RealSuite`` argument, else ``$DIFFGRAPH_METRICS_DIR``), laid out
   either like the Hub repositories (``<weights_dir>/<owner>/<name>/<file>``), as a copy of a
   Hugging Face cache (``<weights_dir>/models--<owner>--<name>/snapshots/<rev>/<file>``), or,
   for the single-file weights, flat (``<weights_dir>/<file>``);
2. the Hugging Face cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub`` (``models--<owner>--<name>/snapshots/<rev>/<file>``; the
   revision named by ``refs/main`` first, then the newest snapshot).

When files are missing, :func:`resolve_all` raises one :class:`MissingMetricWeights` naming,
for every metric, each missing file and every place it was looked for.

Pickled weights (``.pt``/``.pth``/``.bin``) are read only through
``torch.load(weights_only=True)``, which refuses any pickle that would build an arbitrary
object or call a function; such a file raises :class:`UnsafeWeightsError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from diffgraph.errors import DiffGraphError, describe

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class MissingMetricWeights(FileNotFoundError):
    """Some metric weights are not on this machine. ``missing`` maps metric -> lines."""

    def __init__(self, missing: dict[str, list[str]], message: str):
        super().__init__(message)
        self.missing = missing


class UnsafeWeightsError(DiffGraphError, RuntimeError):
    """A pickle checkpoint that ``torch.load(weights_only=True)`` refused to read."""


@dataclass(frozen=True)
class Source:
    """One place a need can be met: a Hub repo and the files it must hold there.

    ``files`` is a tuple of groups; every group must be present, any one name of a group
    will do (e.g. ``("model.safetensors", "pytorch_model.bin")``).
    """

    repo: str
    files: tuple[tuple[str, ...], ...]
    flat_ok: bool = False  # may the files sit directly in weights_dir?


@dataclass(frozen=True)
class Need:
    """Something a metric needs (a model folder, a checkpoint file), with the sources that
    can provide it, tried in order."""

    label: str
    sources: tuple[Source, ...]
    optional: bool = False


@dataclass
class Found:
    directory: Path
    files: dict[str, Path] = field(default_factory=dict)  # group's first name -> actual path
    repo: str = ""

    def path(self, name: str) -> Path:
        return self.files[name]


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def default_weights_dir() -> Path | None:
    value = os.environ.get("DIFFGRAPH_METRICS_DIR")
    return Path(value).expanduser() if value else None


def _snapshots(cache_root: Path, repo: str) -> list[Path]:
    """The snapshot folders of ``repo`` in an HF-cache-shaped folder, preferred first."""
    base = cache_root / ("models--" + repo.replace("/", "--"))
    snaps = base / "snapshots"
    if not snaps.is_dir():
        return []
    ordered: list[Path] = []
    ref = base / "refs" / "main"
    if ref.is_file():
        main = snaps / ref.read_text().strip()
        if main.is_dir():
            ordered.append(main)
    others = sorted((p for p in snaps.iterdir() if p.is_dir() and p not in ordered),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    return ordered + others


def candidate_dirs(source: Source, weights_dir: Path | None) -> tuple[list[Path], list[str]]:
    """Folders that could hold ``source``'s files, and how to describe where we looked."""
    dirs: list[Path] = []
    looked: list[str] = []
    pattern = "models--" + source.repo.replace("/", "--") + "/snapshots/*"
    if weights_dir is not None:
        dirs.append(weights_dir / source.repo)
        looked.append(str(weights_dir / source.repo))
        dirs += _snapshots(weights_dir, source.repo)
        looked.append(str(weights_dir / pattern))
        if source.flat_ok:
            dirs.append(weights_dir)
            looked.append(str(weights_dir))
    cache = hub_cache_dir()
    dirs += _snapshots(cache, source.repo)
    looked.append(str(cache / pattern))
    return dirs, looked


def _match(directory: Path, source: Source) -> Found | None:
    found = Found(directory=directory, repo=source.repo)
    for group in source.files:
        hit = next((directory / n for n in group if (directory / n).is_file()), None)
        if hit is None:
            return None
        found.files[group[0]] = hit
    return found


def resolve(need: Need, weights_dir: Path | None) -> tuple[Found | None, list[str]]:
    """The first source whose files are all present; else None and the lines for the error."""
    report: list[str] = []
    for source in need.sources:
        dirs, looked = candidate_dirs(source, weights_dir)
        for d in dirs:
            hit = _match(d, source)
            if hit is not None:
                return hit, []
        files = " + ".join(" or ".join(g) for g in source.files)
        report.append(f"{files} from {source.repo}; looked in: " + ", ".join(looked))
    if len(report) > 1:
        report = [f"{need.label}, one of:"] + ["    " + r for r in report]
    else:
        report = [f"{need.label}: {report[0]}"]
    return None, report


def resolve_all(needs: dict[str, dict[str, Need]], weights_dir: Path | None) -> dict[str, dict[str, Found | None]]:
    """Resolve every metric's needs at once; raise one error listing everything missing."""
    out: dict[str, dict[str, Found | None]] = {}
    missing: dict[str, list[str]] = {}
    for metric, metric_needs in needs.items():
        out[metric] = {}
        for key, need in metric_needs.items():
            found, report = resolve(need, weights_dir)
            out[metric][key] = found
            if found is None and not need.optional:
                missing.setdefault(metric, []).extend(report)
    if missing:
        where = f"weights_dir={weights_dir}" if weights_dir else "no weights_dir (DIFFGRAPH_METRICS_DIR unset)"
        lines = [f"The real metric suite is missing weights for {len(missing)} metric(s) "
                 f"({', '.join(missing)}); {where}, HF cache={hub_cache_dir()}. Nothing was downloaded."]
        for metric, report in missing.items():
            lines.append(f"  [{metric}]")
            lines += ["    - " + r if not r.startswith("    ") else "      " + r.strip() for r in report]
        lines.append("Copy the files into one of those places (e.g. `hf download <repo> <file>` on a machine "
                     "with internet, then copy its cache), or leave these metrics out with metrics=(...).")
        raise MissingMetricWeights(missing, "\n".join(lines))
    return out


def load_state_dict(path: Path) -> dict:
    """Tensors from a checkpoint: safetensors directly, pickles only with weights_only=True."""
    import torch

    path = Path(path)
    if path.suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, or a RuntimeError wrapping it
        raise UnsafeWeightsError(
            f"refused to read {path}: it is not a plain tensor checkpoint that "
            f"torch.load(weights_only=True) accepts ({describe(exc)}). "
            "DiffGraph never unpickles arbitrary objects; convert the file to .safetensors "
            "from a trusted copy.") from exc


def prefer_safetensors(path: Path) -> Path:
    """A ``.safetensors`` twin of a pickle file, when the user has made one."""
    twin = path.with_suffix(".safetensors")
    return twin if path.suffix in PICKLE_SUFFIXES and twin.is_file() else path
