"""Registries the packages below the core fill in.

The core owns three tables and never imports algorithm code to fill them:

* stages: recipe stage name -> stage class (``distributed``, ``eval``,
  ``compress``, ``delta``, ``prompt`` register theirs on import);
* module types: name -> ``nn.Module`` class an artifact may contain in place of
  an original layer (e.g. a quantized linear), rebuilt on load;
* ONNX lowerings: torch op -> onnxscript function, handed to the exporter;
* attachments: artifact metadata key (``"deltas"``) -> what saves, strips and
  reloads parts a package adds on top of a backbone without changing it;
* invariants: compression record key (``"prune"``, ``"share"``, ...) -> what
  keeps that property through later training and re-checks it after every
  stage (:func:`slimtune.stage.reconcile`).

The top-level package installs a loader (``set_loader``) that imports those
packages on first need, so the tables are full after a plain ``import slimtune``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, TypeVar

from slimtune.errors import RecipeError

T = TypeVar("T")

STAGES: dict[str, type] = {}
MODULE_TYPES: dict[str, type] = {}
ONNX_LOWERINGS: dict[Any, Callable] = {}
INVARIANTS: dict[str, "Invariant"] = {}
ATTACHMENTS: dict[str, "Attachment"] = {}
_loader: Callable[[], None] | None = None


def set_loader(fn: Callable[[], None]) -> None:
    """Install the function that imports every package that registers something."""
    global _loader
    _loader = fn


def ensure_loaded() -> None:
    if _loader is not None:
        _loader()


def register_stage(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make ``cls`` available as recipe stage ``name``."""

    def wrap(cls: type[T]) -> type[T]:
        if name in STAGES and STAGES[name] is not cls:
            raise ValueError(f"stage {name!r} registered twice: {STAGES[name]} and {cls}")
        cls.name = name
        STAGES[name] = cls
        return cls

    return wrap


def register_module_type(cls: type[T]) -> type[T]:
    """Class decorator: let artifacts contain ``cls`` (rebuilt by its name on load)."""
    MODULE_TYPES[cls.__name__] = cls
    return cls


def register_onnx_lowering(op: Any, fn: Callable) -> None:
    """Export torch op ``op`` to ONNX with the onnxscript function ``fn``."""
    ONNX_LOWERINGS[op] = fn


class Invariant:
    """What a compression record promises about the model, kept and re-checked by later stages.

    Subclasses override either method:

    * ``keep(model, record)``: a ``model -> None`` hook a training stage calls
      after every optimizer step to keep the property (e.g. re-zero pruned
      weights), or None.
    * ``check(model, record)``: ``(record, message)`` after a stage ran: the record
      as it still holds (recomputed from the model), or None when the
      property is gone; ``message`` tells the user what changed (None: nothing did).
    """

    def keep(self, model, record: dict) -> Callable | None:
        return None

    def check(self, model, record: dict) -> tuple[dict | None, str | None]:
        return record, None


def register_invariant(key: str, invariant: Invariant) -> None:
    """Keep and re-check ``compression[key]`` records with ``invariant``."""
    INVARIANTS[key] = invariant


class Attachment(ABC):
    """Parts a package attaches on top of a backbone (deltas), stored beside its unchanged weight files.

    :meth:`slimtune.artifact.Artifact.save` writes the backbone inside every
    attachment's :meth:`stripped` context (so its files are the backbone's own,
    and may be hard links to them), then calls :meth:`save`; loading an
    artifact calls :meth:`load` after the backbone's weights are in place.
    """

    def present(self, model) -> bool:
        """Whether ``model`` carries this attachment."""
        return False

    def bound_to(self, recorded) -> set[str]:
        """The sha256s of the backbone weight files ``recorded`` (what the artifact holds) is bound to."""
        return set()

    @abstractmethod
    def stripped(self, model):
        """A context manager in which ``model`` is the bare backbone."""

    @abstractmethod
    def save(self, model, info, directory, backbone_sha256: str) -> Any:
        """Write this attachment's files into ``directory``; return what ``slimtune.json`` records of it.

        ``info`` is what the artifact recorded so far (None when nothing);
        ``backbone_sha256`` is the sha256 of the backbone weight file written beside it.
        """

    @abstractmethod
    def load(self, model, recorded, directory, backbone_sha256: str) -> None:
        """Attach what ``recorded`` (as :meth:`save` returned it) describes, from the files in ``directory``."""


def register_attachment(key: str, attachment: Attachment) -> None:
    """Save and reload ``slimtune.json``'s ``attachments[key]`` with ``attachment``."""
    ATTACHMENTS[key] = attachment


def get_stage(name: str) -> type:
    """Look up a stage class by name, loading the plugin packages first."""
    ensure_loaded()
    if name not in STAGES:
        raise RecipeError(
            f"unknown stage {name!r}",
            f"use one of: {', '.join(sorted(STAGES))}",
        )
    return STAGES[name]
