"""Named records of one kind (ensemble methods, mixer architectures, base-model families), each
declared once in its own module.

A registry lists the modules that hold its built-in records (each module's `RECORD`, or
`RECORDS` for several) and reads them on first use, so a new method, mixer or family is one
module plus one line in that list. Other packages add theirs through an entry point of the
registry's group (the entry point's object: a record or a tuple of records), and code (a test,
a notebook) with `register` or, for a while, `registered`.
"""
from __future__ import annotations

import contextlib
import importlib
from importlib import metadata
from typing import Generic, Iterator, TypeVar

from core.errors import PipelineError

R = TypeVar("R")


class Registry(Generic[R]):
    def __init__(self, kind: str, modules: tuple[str, ...], group: str | None = None):
        self.kind = kind           # "ensemble method", "mixer architecture", "base-model family"
        self.modules = modules
        self.group = group         # entry point group, e.g. "stem_ensemble.methods"
        self._records: dict[str, R] | None = None

    def _load(self) -> dict[str, R]:
        if self._records is None:
            self._records = {}
            for name in self.modules:
                module = importlib.import_module(name)
                found = getattr(module, "RECORDS", None) or (getattr(module, "RECORD"),)
                for record in found:
                    self._add(record)
            if self.group:
                for ep in metadata.entry_points(group=self.group):
                    loaded = ep.load()
                    for record in loaded if isinstance(loaded, (tuple, list)) else (loaded,):
                        self._add(record)
        return self._records

    def _add(self, record: R, replace: bool = False) -> None:
        name = record.name
        if name in self._records and not replace:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._records[name] = record

    def register(self, record: R, replace: bool = False) -> R:
        self._load()
        self._add(record, replace)
        return record

    def unregister(self, name: str) -> None:
        self._load().pop(name, None)

    @contextlib.contextmanager
    def registered(self, *records: R) -> Iterator[None]:
        """The records registered inside the block only (tests, experiments in a notebook)."""
        before = dict(self._load())
        for r in records:
            self.register(r, replace=True)
        try:
            yield
        finally:
            self._records = before

    def names(self) -> list[str]:
        return list(self._load())

    def records(self) -> list[R]:
        return list(self._load().values())

    def __contains__(self, name: str) -> bool:
        return name in self._load()

    def get(self, name: str) -> R:
        records = self._load()
        if name not in records:
            raise PipelineError(f"{self.kind} '{name}': choose one of {', '.join(records)}")
        return records[name]
