"""Project exceptions.

A :class:`SlimTuneError` is a user error: bad recipe, missing file, unknown
model. Its message says what was wrong, where, and how to fix it. The CLI
prints it without a traceback and exits with code 2.
"""

from __future__ import annotations


class SlimTuneError(Exception):
    """An error the user can fix; the CLI shows the message and exits with 2."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class RecipeError(SlimTuneError):
    """The recipe (or a --set override) does not validate."""


class DataError(SlimTuneError):
    """Task data is missing, unreadable, or lacks a configured column."""


class ModelSourceError(SlimTuneError):
    """A model reference cannot be resolved (missing dir, offline hub id...)."""


class ArtifactError(SlimTuneError):
    """An artifact directory is missing, incomplete, or of an unknown format."""


class LaunchError(SlimTuneError):
    """A distributed run cannot start here (too many processes, unreachable rendezvous...)."""


class RunFailed(SlimTuneError):
    """A launched run failed after starting; its ranks printed why. Not an input error."""

    exit_code = 1
