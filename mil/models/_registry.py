"""A registry of MIL students that knows no models (timm-style).

A student file registers a builder function; the builder's name is the model's name::

    @register_model(model_cls=ABMIL, param_counts=(ParamCount(657_026, source="..."),))
    def abmil(in_dim, n_classes, **kwargs):
        return ABMIL(in_dim, n_classes, **kwargs)

``create_model`` validates the name, ``in_dim``, ``n_classes`` and the keyword names (against the
model class's signature) and drops keywords left as None, so an unset CLI flag or YAML key
never overrides a model's default.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from extract.errors import ConfigError
from extract.runtime import check_int

from ._base import MILModel

__all__ = [
    "ParamCount",
    "ModelInfo",
    "register_model",
    "create_model",
    "list_models",
    "model_info",
    "count_parameters",
]


@dataclass(frozen=True)
class ParamCount:
    """A reference parameter count for ``in_dim=1024, n_classes=2`` and the given keywords.

    ``source`` says where the number comes from (the paper, or the official code's modules).
    Tests check every recorded count exactly.
    """

    count: int
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry."""

    name: str
    builder: Callable[..., MILModel]
    model_cls: type[MILModel]
    summary: str
    param_counts: tuple[ParamCount, ...] = ()

    @property
    def options(self) -> tuple[str, ...]:
        """Keyword arguments the model accepts besides ``in_dim`` and ``n_classes``.

        Read from the ``__init__`` signatures up the class hierarchy (a subclass whose
        ``__init__`` takes ``**kwargs`` inherits its parent's options), minus the names a
        subclass fixes itself (its ``fixed_options``).
        """
        names: list[str] = []
        for klass in self.model_cls.__mro__:
            if "__init__" not in vars(klass) or klass in (MILModel, nn.Module, object):
                continue
            params = inspect.signature(vars(klass)["__init__"]).parameters.values()
            for p in params:
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in names:
                    names.append(p.name)
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        fixed = set(getattr(self.model_cls, "fixed_options", ())) | {"self", "in_dim", "n_classes"}
        return tuple(n for n in names if n not in fixed)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    *, model_cls: type[MILModel], param_counts: tuple[ParamCount, ...] = ()
) -> Callable[[Callable[..., MILModel]], Callable[..., MILModel]]:
    """Decorator registering a builder ``fn(in_dim, n_classes, **kwargs) -> MILModel``.

    Raises
    ------
    ValueError
        When a model of the same name is already registered.
    """

    def decorate(fn: Callable[..., MILModel]) -> Callable[..., MILModel]:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(
                f"A MIL model named {name!r} is already registered "
                f"(by {_REGISTRY[name].builder.__module__}); pick another builder name."
            )
        doc = inspect.getdoc(fn) or inspect.getdoc(model_cls) or ""
        summary = doc.strip().splitlines()[0] if doc.strip() else ""
        _REGISTRY[name] = ModelInfo(name, fn, model_cls, summary, tuple(param_counts))
        return fn

    return decorate


def list_models() -> list[str]:
    """Names of all registered MIL students, sorted."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``; raises ConfigError listing the valid names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(
            f"Unknown MIL model {name!r}. Valid models: {', '.join(list_models())}."
        )
    return _REGISTRY[name]


def create_model(name: str, in_dim: int, n_classes: int, **kwargs: Any) -> MILModel:
    """Build the MIL student ``name`` for ``in_dim``-d instances and ``n_classes`` outputs.

    Keywords left as None are dropped (the model's default applies). Unknown names, bad
    ``in_dim``/``n_classes`` and keywords the model does not take raise ConfigError.
    """
    info = model_info(name)
    check_int("in_dim", in_dim, "create_model")
    check_int("n_classes", n_classes, "create_model")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    accepted = info.options
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"MIL model {name!r} does not take the parameter(s) {', '.join(map(repr, unknown))}. "
            f"Accepted: {', '.join(accepted)}."
        )
    return info.builder(in_dim, n_classes, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
