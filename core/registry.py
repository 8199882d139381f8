"""One small registry type for everything chosen by name (backbones, heads): duplicates raise, lookups explain."""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from core.errors import HexpressError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> item; ``register`` refuses a second item under a name, ``get`` names the choices."""

    def __init__(self, kind: str, error: type[HexpressError]):
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise self.error(f"{self.kind} '{name}' is already registered; pick another name.")
        self._items[name] = item
        return item

    def get(self, name: str, hint: str = "") -> T:
        if name not in self._items:
            raise self.error(f"unknown {self.kind} '{name}'; choose one of {', '.join(self.names())}{hint}.")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self):
        return self._items.items()
