"""What the settings dataclasses share: one way to be built from CLI options or a dict."""

from __future__ import annotations

from dataclasses import fields


class FromOptions:
    """Mixin for settings dataclasses that have a ``validate()`` method."""

    @classmethod
    def from_options(cls, options, **overrides):
        """The one place these settings are built (CLI namespace or dict, then ``overrides``).

        Options absent or ``None`` keep the dataclass default; the result is validated.
        """
        source = options if isinstance(options, dict) else vars(options)
        chosen = {f.name: source[f.name] for f in fields(cls) if source.get(f.name) is not None}
        s = cls(**{**chosen, **overrides})
        s.validate()
        return s
