"""Registries of the things a package adds to DiffGraph by name: base-model profiles
(entry-point group ``diffgraph.bases``), metric suites (``diffgraph.suites``), source kinds
(``diffgraph.sources``), base-model families (``diffgraph.families``), CLI commands
(``diffgraph.commands``) and agent tools (``diffgraph.tools``, where one entry point may name
several tools: tools/plugins.py unpacks them).

A package registers in its own pyproject.toml, exactly as the bundled mini world does::

    [project.entry-points."diffgraph.bases"]
    my-base = "my_package.diffgraph_plugin:BASE"

Entry points are read once, on first use. One that fails to load is skipped and reported
(``errors``), never fatal: a broken plugin must not take the other bases down. Two entries of
one name are refused for the second, so no plugin can silently replace another's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from diffgraph.errors import describe

T = TypeVar("T")
log = logging.getLogger(__name__)


class Registry(Generic[T]):
    """Named objects of one kind: built-ins registered in code, then the group's entry points."""

    def __init__(self, group: str, what: str, check: Callable[[object], T] | None = None, *,
                 unpack: Callable[[EntryPoint, object], Iterable[tuple[str, T]]] | None = None):
        """``check`` turns what an entry point names into a T or raises; ``unpack`` instead turns
        it into several (name, T), for groups whose entries may hold more than one object."""
        self.group, self.what = group, what
        check = check or (lambda obj: obj)
        self._unpack = unpack or (lambda ep, obj: [(ep.name, check(obj))])
        self._items: dict[str, T] = {}
        self._loaded = False
        self._lock = threading.Lock()
        self.errors: list[str] = []  # "entry point: why it was skipped"

    def register(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"a {self.what} named {name!r} is already registered")
        self._items[name] = obj

    def _load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            for ep in sorted(entry_points(group=self.group), key=lambda e: e.name):
                try:
                    items = list(self._unpack(ep, ep.load()))
                    names = [name for name, _ in items]
                    taken = [n for i, n in enumerate(names) if n in self._items or n in names[:i]]
                    if taken:
                        raise ValueError(f"a {self.what} named {taken[0]!r} is already registered")
                    self._items.update(items)
                except Exception as exc:  # a broken plugin is reported, not fatal
                    message = f"{ep.name} ({ep.value}): {describe(exc, 200)}"
                    log.warning("skipping %s %s", self.what, message)
                    self.errors.append(message)
            self._loaded = True

    def names(self) -> list[str]:
        self._load()
        return list(self._items)

    def values(self) -> list[T]:
        self._load()
        return list(self._items.values())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def get(self, name: str) -> T:
        """The object registered as ``name``; KeyError (one line, naming the known ones) if none."""
        self._load()
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self._items) or "none"
            raise KeyError(f"no {self.what} named {name!r} (known: {known})") from None
