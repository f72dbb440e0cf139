"""Named back ends of one kind (export formats, bench engines), registered like passes.

Built-ins register when their modules import; plugins register when the spec's `plugins` modules
import, or through an installed package's entry points (group `graphprune.formats` /
`graphprune.engines`). Each back end has a pydantic model of its options, so a spec's options are
checked before anything loads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError


class NoOptions(BaseModel):
    """A back end without options."""

    model_config = ConfigDict(extra="forbid")


class RegistryError(UserError):
    """An unknown back end name, or options it does not take."""


@dataclass(frozen=True)
class Backend:
    """One registered back end: its name, the function that runs it, its options model, a one-line doc."""

    name: str
    fn: Callable[..., Any]
    options: type[BaseModel]
    doc: str
    hooks: dict[str, Any] = field(default_factory=dict)  # optional steps and facts its caller documents

    def checked_options(self, values: dict[str, Any] | None, where: str) -> BaseModel:
        try:
            return self.options.model_validate(values or {})
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(options)'}: {e['msg']}" for e in err.errors())
            raise RegistryError(f"{where}: {problems}") from None


T = TypeVar("T", bound=Backend)


class Registry(Generic[T]):
    def __init__(self, what: str, group: str, builtins: tuple[str, ...]):
        self.what, self.group, self.builtins = what, group, builtins
        self.items: dict[str, Backend] = {}
        self._loaded = False

    def register(self, name: str, options: type[BaseModel] = NoOptions,
                 **hooks: Any) -> Callable[[Callable], Callable]:
        """Decorator: register `fn` as back end `name`, configured by the `options` model; `hooks` are the
        optional steps and facts its caller documents (bench: `prepare`, `settings`, `reads_export`)."""

        def decorate(fn: Callable) -> Callable:
            self.items[name] = Backend(name, fn, options, (fn.__doc__ or "").strip().split("\n")[0], hooks)
            return fn

        return decorate

    def load(self) -> Registry[T]:
        """The built-ins and the installed entry points (once); plugin modules register when imported."""
        if not self._loaded:
            self._loaded = True
            for module in self.builtins:
                importlib.import_module(module)
            for entry in entry_points(group=self.group):
                entry.load()
        return self

    def names(self, built_in: bool = False) -> list[str]:
        """Registered names (only graphprune's own with `built_in`: what the JSON Schema lists)."""
        return sorted(name for name, backend in self.load().items.items()
                      if not built_in or backend.fn.__module__ in self.builtins)

    def get(self, name: str, where: str) -> Backend:
        backend = self.load().items.get(name)
        if backend is None:
            raise RegistryError(f"{where}: unknown {self.what} {str(name)[:100]!r}; registered: "
                                f"{', '.join(self.names())}")
        return backend
