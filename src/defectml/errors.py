"""Exceptions that carry a message meant for the user.

Every error a user can cause (bad file, impossible defect, unsupported element, ...) is raised
as a subclass of :class:`DefectMLError`; the CLI prints its message on one line and exits
non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DefectMLError(Exception):
    """Base class of all user-facing errors."""


class InputError(DefectMLError):
    """A structure file, defect specification or option is invalid."""


class ModelError(DefectMLError):
    """A model cannot be loaded or does not cover the structure's elements."""


class StoreError(DefectMLError):
    """The results store cannot be opened, read or written."""


class UntrustedPrediction(DefectMLError):
    """The direct predictor's output is non-finite or moves atoms beyond anything it was trained on."""
