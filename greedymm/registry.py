"""The plug-in registries (methods, SPEC Sec. 5, 9, 12; datasets, Sec. 1, 10; fusions, Sec. 2, 13): ordered tables at
the bottom of the import graph, so that `greedymm.config` checks settings against them. Entries register when their
module is imported; a registry imports its built-in modules by name on its first look-up.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Sequence


class Registry:
    """Named entries in a stable order: by `order(entry)`, then by registration.

    Args:
        kind: what an entry is, as error messages name it (e.g. "algorithm", "dataset").
        builtins: modules that register the built-in entries, imported on the first look-up.
        order: the sort key of an entry (e.g. its `order` attribute); registration order when equal.
    """

    def __init__(self, kind: str, builtins: Sequence[str], order: Callable[[Any], float]) -> None:
        self.kind, self.builtins, self.order = kind, tuple(builtins), order
        self._entries: Dict[str, Any] = {}
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # first: a built-in module that looks an entry up while it loads must not recurse
            for module in self.builtins:
                importlib.import_module(module)

    def add(self, name: str, entry: Any) -> None:
        """Register `entry` under `name`; a name is registered once (`remove` it first to replace it)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Unregister `name` (e.g. a test's own entry)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> Any:
        """The entry of `name`; ValueError naming the allowed names if there is none."""
        self._load()
        if name not in self._entries:
            raise ValueError(f"{self.kind}={name!r} is unknown; allowed: {', '.join(self.names())}")
        return self._entries[name]

    def registered(self) -> Dict[str, Any]:
        """The entries registered so far, without importing the built-ins (for checks while they register)."""
        return dict(self._entries)

    def names(self) -> List[str]:
        """Every registered name, in order."""
        return [name for name, _ in self.items()]

    def items(self) -> List[tuple]:
        """(name, entry) pairs, in order."""
        self._load()
        return sorted(self._entries.items(), key=lambda item: self.order(item[1]))

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries


# The training methods (classes derived from greedymm.methods.Method), in the paper's Table-1 order.
METHODS = Registry("algorithm", ("greedymm.methods",), order=lambda method: method.order)
# The datasets (greedymm.data.DatasetSpec), the paper's first.
DATASETS = Registry("dataset", ("greedymm.data.modelnet", "greedymm.data.embedded", "greedymm.data.digits"),
                    order=lambda spec: spec.order)
# The fusions of a two-branch model (greedymm.models.fusions.FusionSpec): MMTM (the paper's) first, then late fusion.
FUSIONS = Registry("fusion", ("greedymm.models.fusions",), order=lambda spec: spec.order)
