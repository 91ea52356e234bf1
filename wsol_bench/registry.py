"""One small registry for every family the configs name: explainers, datasets, scorers (the
measures), metric-state classes and config schemas.

A `Registry` is a dict from the name a config uses to the class or builder, in registration
order (the order a family is run or listed in), with a decorator to register, a lookup that
refuses an unknown name in one line listing the valid ones, and, where a family accepts
third-party packages, the entry points of a group loaded on first use (a plugin that fails to
import is remembered and refused only when a run asks for it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import TypeVar

from wsol_bench.errors import SettingError, UserError

T = TypeVar("T")


class PluginImportError(UserError, ImportError):
    """A plugin a run asks for failed to import; the message names it and the cause."""


class Registry(dict[str, T]):
    """Names -> entries of one family. `kind` names the family in messages ("method",
    "dataset", "scorer"), `group` an entry-point group whose plugins join the registry on
    first lookup, `accepts` which of their objects are entries."""

    def __init__(self, kind: str, *, group: str | None = None, accepts: Callable[[object], bool] | None = None
                 ) -> None:
        super().__init__()
        self.kind, self.group = kind, group
        self.accepts = accepts  # which loaded entry-point objects are entries (None: all)
        self.broken: dict[str, str] = {}  # plugin name -> why it failed to import
        self.from_plugins: set[str] = set()
        self.plugins_loaded = group is None

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make the decorated class or function the entry `name`; a class learns its
        name (`cls.name`). A second entry under a name already taken is refused."""
        def wrap(entry: T) -> T:
            if name in self and self[name] is not entry:
                raise SettingError(f"{self.kind} name {name!r} is already registered by {self[name]}")
            if isinstance(entry, type):
                entry.name = name
            self[name] = entry
            return entry
        return wrap

    def load_plugins(self, force: bool = False) -> None:
        """Register every object the entry-point group advertises (once, unless `force`)."""
        if self.plugins_loaded and not force:
            return
        self.plugins_loaded = True
        for point in entry_points(group=self.group):
            try:
                entry = point.load()
            except Exception as exc:  # noqa: BLE001  (any failure of third-party code)
                self.broken[point.name] = f"{self.kind} plugin {point.name!r} ({point.value}) failed to import: {exc}"
                continue
            if point.name not in self and (self.accepts is None or self.accepts(entry)):
                self.register(point.name)(entry)
                self.from_plugins.add(point.name)

    def fresh(self) -> Registry[T]:
        """A copy holding the built-in entries only, its plugins not loaded yet: the registry
        as a new process has it (tests install plugins into one)."""
        copy = Registry(self.kind, group=self.group, accepts=self.accepts)
        copy.update({name: entry for name, entry in self.items() if name not in self.from_plugins})
        return copy

    def names(self) -> list[str]:
        """Every registered name, plugins included, sorted."""
        self.load_plugins()
        return sorted(self)

    def entries(self) -> Iterator[tuple[str, T]]:
        """(name, entry) in registration order, plugins included (after the built-in ones)."""
        self.load_plugins()
        return iter(list(self.items()))

    def lookup(self, name: str) -> T:
        """The entry `name`; a plugin that failed to import, or an unknown name, is refused in
        one line (the valid names listed)."""
        self.load_plugins()
        if name not in self and name in self.broken:
            raise PluginImportError(self.broken[name])
        if name not in self:
            raise SettingError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self[name]
