"""Progress bars (tqdm) that the CLI's ``--quiet`` turns off everywhere."""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def quiet() -> bool:
    return os.environ.get("SLIMTUNE_QUIET", "0") == "1"


def set_quiet(value: bool) -> None:
    os.environ["SLIMTUNE_QUIET"] = "1" if value else "0"


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None, leave: bool = False, initial: int = 0) -> tqdm:
    """A tqdm bar, disabled under --quiet and on every rank but 0."""
    hidden = quiet() or os.environ.get("RANK", "0") != "0"
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=hidden, dynamic_ncols=True, initial=initial)
