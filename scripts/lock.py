"""requirements.lock: the exact environment in which README's test command last passed.

The lock is ``pip freeze`` of a fresh environment that scripts/refresh-lock installed from
pyproject.toml's ranges and then ran the whole test suite in; it is written only after the
suite passed. A frozen, tested environment was chosen over a resolver's output (pip-compile,
``uv lock``): a resolver records what it would install, not what was tested, and neither sees
the CPU build of torch that the install puts first (uv does not look at the local wheel, and
pip-compile records PyPI's CUDA dependency tree for torch). Installs read it as a constraints
file (``pip install -c requirements.lock ...``), so pip still checks that the pinned set is
consistent, and extra packages only a user's platform needs (a CUDA torch's nvidia-* wheels)
are not blocked.

    python scripts/lock.py write --tested "394 passed in 824s"   # the running environment -> lock
    python scripts/lock.py check                                   # the running environment == lock
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


def _pin(line: str) -> str:
    """A pin without its local version label (torch==2.13.0+cpu -> torch==2.13.0): the CPU
    build satisfies it here, and a CUDA user's PyPI build of the same release does too."""
    name, _, version = line.partition("==")
    return f"{re.sub(r'[-_.]+', '-', name).lower()}=={version.split('+')[0]}"


def installed() -> list[str]:
    """The running environment's packages as sorted pins, editable installs (the project and
    its example plugin) left out."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    return sorted(_pin(line) for line in out.splitlines() if "==" in line and not line.startswith("#"))


def locked(path: Path = LOCK) -> list[str]:
    return sorted(_pin(line) for line in path.read_text().splitlines() if "==" in line and not line.startswith("#"))


def write(path: Path, tested: str) -> None:
    header = [
        "# requirements.lock: pip freeze of the environment README's test command passed in.",
        "# Written by scripts/refresh-lock; install through it with `pip install -c requirements.lock ...`.",
        f"# Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d}: {tested}",
    ]
    path.write_text("\n".join(header + installed()) + "\n")


def check(path: Path) -> int:
    have, want = set(installed()), set(locked(path))
    if have == want:
        print(f"environment matches {path.name} ({len(want)} packages)")
        return 0
    for pin in sorted(want - have):
        print(f"locked but not installed: {pin}")
    for pin in sorted(have - want):
        print(f"installed but not locked: {pin}")
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the lock from the running environment")
    w.add_argument("--tested", required=True, help="the test run's summary line, recorded in the header")
    sub.add_parser("check", help="exit 1 unless the running environment is exactly the lock")
    for p in sub.choices.values():
        p.add_argument("--lock", type=Path, default=LOCK)
    args = parser.parse_args()
    if args.command == "write":
        write(args.lock, args.tested)
        return 0
    return check(args.lock)


if __name__ == "__main__":
    sys.exit(main())
