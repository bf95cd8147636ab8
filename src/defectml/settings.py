"""What the settings dataclasses share: one way to be built from CLI options or a dict.

A field is read from the option of the same name (``fmax`` from ``--fmax``), after the class's
``OPTIONS_PREFIX`` (``soap_`` + ``r_cut``: ``--soap-r-cut``); a class names the few exceptions in
``OPTION_NAMES``. A field that holds settings of its own
(a nested dataclass) says so in its metadata, ``{"options": ...}``: either a prefix, or a mapping
of the nested field names to the option names they are read from (the loop's ``--train-patience``
is its fine-tuning settings' ``patience``: the loop has a ``--patience`` of its own). Its default
value is the starting point; options given replace its fields. A field whose option is text to
parse (``--distortions -0.6:0.6:0.1``) names its parser in its metadata, ``{"parse": fn}``: it is
applied to text values, so a command line, a dict and a settings file all work, and a bad value is
the parser's one-line ``InputError``.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import ClassVar


class FromOptions:
    """Mixin for settings dataclasses that have a ``validate()`` method."""

    #: What this class's option names start with (before the field name).
    OPTIONS_PREFIX: ClassVar[str] = ""
    #: Fields whose option is not prefix + field name (``SplitSettings.by``: ``--split-by``).
    OPTION_NAMES: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_options(cls, options, **overrides):
        """The one place these settings are built (CLI namespace or dict, then ``overrides``).

        Options absent or ``None`` keep the dataclass default; the result is validated.
        """
        source = options if isinstance(options, dict) else vars(options)
        s = cls(**{**chosen_fields(cls, source, cls.OPTIONS_PREFIX, skip=overrides), **overrides})
        s.validate()
        return s


def chosen_fields(cls, source: dict, names: str | dict[str, str], skip=()) -> dict:
    """The fields of ``cls`` that ``source`` sets (``names``: a prefix, or field -> option name).

    Nested settings fields (metadata ``options``) are built from their default value and the
    options that name their fields, then validated.
    """
    out = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        nested = f.metadata.get("options")
        if nested is not None:
            default = f.default_factory()
            sub = replace(default, **chosen_fields(type(default), source, nested))
            if hasattr(sub, "validate"):
                sub.validate()
            out[f.name] = sub
            continue
        name = _option_name(cls, f.name, names)
        if name is not None and source.get(name) is not None:
            value, parse = source[name], f.metadata.get("parse")
            out[f.name] = parse(value) if parse and isinstance(value, str) else value
    return out


def option_values(settings, names: str | dict[str, str] | None = None) -> dict:
    """The options that would build ``settings`` (the inverse of :func:`chosen_fields`).

    Used to write what a run actually used, defaults included, beside its results.
    """
    cls = type(settings)
    names = getattr(cls, "OPTIONS_PREFIX", "") if names is None else names
    out = {}
    for f in fields(cls):
        value = getattr(settings, f.name)
        nested = f.metadata.get("options")
        if nested is not None:
            out.update(option_values(value, nested))
            continue
        name = _option_name(cls, f.name, names)
        if name is not None:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _option_name(cls, field_name: str, names: str | dict[str, str]) -> str | None:
    """The option a field is read from.

    ``names[field]`` for a nested mapping (``None`` if absent), else the class's ``OPTION_NAMES``
    exception, else the prefix ``names`` + the field name.
    """
    if isinstance(names, dict):
        return names.get(field_name)
    return getattr(cls, "OPTION_NAMES", {}).get(field_name, names + field_name)
