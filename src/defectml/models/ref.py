"""Models as keyed references: which weights, of which family, with which head.

A :class:`ModelRef` names a model by content: its ``key`` is the family, the sha256 of the weights
file and the head (SevenNet modal), so a fine-tuned file is a model of its own, renaming it keeps
its key, and retraining it into the same path gives a new key (and so new results on resume).

Spelling a model (``--model``):

* a built-in name, :data:`BUILTINS` (weights inside the installed wheels; nothing downloaded);
* a weights file: ``ft.pth.tar`` (CHGNet), ``checkpoint.pth`` (SevenNet), ``x.model`` (MACE);
  a family prefix (``chgnet:``, ``sevennet:``, ``mace:``) overrides the guess by suffix;
* ``@HEAD`` after either picks a head: ``sevennet-mf-0@R2SCAN``, ``ft.pth@HSE06``.

A model card (``<weights file>.card.json``: family, base model, elements, heads, charge-aware,
training-data hash, metrics) is read when present; its ``family`` beats the suffix guess.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from defectml.errors import ModelError

FAMILIES = ("chgnet", "sevennet", "mace", "emt", "calculator")


@dataclass(frozen=True)
class Builtin:
    """A model that ships inside an installed package."""

    family: str
    weights: str  # the family's own name for the weights
    head: str | None = None
    package: str = ""


BUILTINS: dict[str, Builtin] = {
    "chgnet": Builtin("chgnet", "0.3.0", package="chgnet"),
    "chgnet-0.2.0": Builtin("chgnet", "0.2.0", package="chgnet"),
    "chgnet-r2scan": Builtin("chgnet", "r2scan", package="chgnet"),
    "sevennet-0": Builtin("sevennet", "7net-0", package="sevenn"),
    "sevennet-l3i5": Builtin("sevennet", "7net-l3i5", package="sevenn"),
    "sevennet-mf-0": Builtin("sevennet", "7net-mf-0", head="PBE", package="sevenn"),
    "emt": Builtin("emt", "emt", package="ase"),
}
BUILTIN_MODELS = tuple(BUILTINS)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def card_path(weights: str | Path) -> Path:
    """Where a weights file's model card lives: ``<file>.card.json`` beside it."""
    p = Path(weights)
    return p.with_name(p.name + ".card.json")


def read_card(weights: str | Path) -> dict | None:
    """The model card beside ``weights``, or ``None``.

    Raises:
        ModelError: the card exists but is not a JSON object.
    """
    path = card_path(weights)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {path} is unreadable: {exc}") from None
    if not isinstance(card, dict):
        raise ModelError(f"model card {path} is not a JSON object")
    return card


@dataclass(frozen=True)
class ModelRef:
    """A reference to one model's weights.

    Attributes:
        family: ``chgnet``, ``sevennet``, ``mace``, ``emt`` or ``calculator`` (a user's object).
        source: A built-in name (:data:`BUILTINS`) or the absolute path of a weights file.
        head: The head / modal to predict with (SevenNet multi-fidelity), or ``None``.
        device: ``cpu`` or ``cuda``; not part of the key.
        calculator_id: For ``calculator``: the class and its parameters (what can be known).
    """

    family: str
    source: str
    head: str | None = None
    device: str = field(default="cpu", compare=False)
    calculator_id: str | None = None

    @property
    def builtin(self) -> Builtin | None:
        """The built-in entry, if this is one."""
        return BUILTINS.get(self.source)

    @cached_property
    def weights_path(self) -> Path | None:
        """The weights file (built-ins: the one inside the installed wheel); ``None`` if none."""
        b = self.builtin
        if b is None:
            return Path(self.source) if self.family != "calculator" else None
        return builtin_weights_path(self.source)

    @cached_property
    def weights_sha256(self) -> str:
        """sha256 of the weights (for a user calculator: of its class and parameters)."""
        if self.family == "calculator":
            return hashlib.sha256((self.calculator_id or "").encode()).hexdigest()
        path = self.weights_path
        try:
            return sha256_file(path)
        except OSError as exc:
            raise ModelError(f"cannot read the weights of {self.label} ({path}): {exc.strerror}") from None

    @property
    def key(self) -> str:
        """``family-<sha256[:16]>[@head]``: the same bytes give the same key, whatever the name."""
        return f"{self.family}-{self.weights_sha256[:16]}" + (f"@{self.head}" if self.head else "")

    @property
    def label(self) -> str:
        """A name for people: the built-in name or the file name, with its head."""
        name = self.source if self.builtin or self.family == "calculator" else Path(self.source).name
        default_head = self.builtin.head if self.builtin else None
        return name + (f"@{self.head}" if self.head and self.head != default_head else "")

    @cached_property
    def card(self) -> dict | None:
        """The model card beside a weights file (built-ins have none)."""
        return None if self.builtin or self.weights_path is None else read_card(self.weights_path)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, stored with every result (``key`` included, for checks on reload)."""
        d = {k: v for k, v in asdict(self).items() if v is not None}
        d["key"] = self.key
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelRef:
        """Inverse of :meth:`to_dict` (the stored ``key`` is ignored here; see :func:`check_key`)."""
        return cls(d["family"], d["source"], d.get("head"), d.get("device", "cpu"), d.get("calculator_id"))

    def with_device(self, device: str) -> ModelRef:
        """The same model on another device."""
        return ModelRef(self.family, self.source, self.head, device, self.calculator_id)


def builtin_weights_path(name: str) -> Path:
    """The weights file of the built-in model ``name`` inside its installed package."""
    b = BUILTINS[name]
    try:
        if b.family == "chgnet":
            import chgnet

            folder = Path(chgnet.__file__).parent / "pretrained" / b.weights
            return next(folder.glob("*.pth.tar"))
        if b.family == "sevennet":
            from sevenn.util import pretrained_name_to_path

            return Path(pretrained_name_to_path(b.weights))
        if b.family == "emt":
            import ase.calculators.emt as emt  # EMT's parameters live in its source file

            return Path(emt.__file__)
    except ImportError:
        raise ModelError(
            f"model {name} needs {b.package}: pip install 'defectml[sevennet]'"
            if b.family == "sevennet" else f"model {name} needs the {b.package} package"
        ) from None
    except (StopIteration, ValueError, OSError) as exc:
        raise ModelError(f"the weights of {name} are not in the installed {b.package}: {exc}") from None
    raise ModelError(f"no weights file for family {b.family}")


def _family_from_suffix(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".pth.tar"):
        return "chgnet"
    if name.endswith(".pth"):
        return "sevennet"
    if name.endswith(".model"):
        return "mace"
    return None


def parse_model(spec: str | ModelRef, device: str = "cpu") -> ModelRef:
    """A :class:`ModelRef` from ``--model`` text (see the module docstring for the spellings).

    Raises:
        ModelError: unknown name, missing file, unknown family or a head given twice.
    """
    if isinstance(spec, ModelRef):
        return spec if spec.device == device else spec.with_device(device)
    text = str(spec).strip()
    head = None
    base, at, tail = text.rpartition("@")
    if at and tail and "/" not in tail:
        text, head = base, tail
    if text.lower() in BUILTINS:
        name = text.lower()
        b = BUILTINS[name]
        if head and b.family != "sevennet":
            raise ModelError(f"model {name} has no heads; drop '@{head}'")
        return ModelRef(b.family, name, head or b.head, device)
    family, _, rest = text.partition(":")
    if family in FAMILIES[:3] and rest:
        path, forced = Path(rest), family
    else:
        path, forced = Path(text), None
    if not path.is_file():
        if forced is None and "/" not in text and _family_from_suffix(path) is None:
            raise ModelError(
                f"unknown model {text!r}: use one of {', '.join(BUILTIN_MODELS)} or a weights file"
            )
        raise ModelError(f"model file not found: {path}")
    path = path.resolve()
    card = read_card(path) or {}
    family = forced or card.get("family") or _family_from_suffix(path)
    if family not in FAMILIES[:3]:
        raise ModelError(
            f"cannot tell which family {path.name} belongs to: name it chgnet:{path}, "
            f"sevennet:{path} or mace:{path}, or give it a model card ({card_path(path).name})"
        )
    if head is None and card.get("default_head"):
        head = card["default_head"]
    return ModelRef(family, str(path), head, device)


def check_key(stored: dict[str, Any]) -> ModelRef:
    """The model a stored result was made with, refusing one whose weights changed since.

    Raises:
        ModelError: the weights file is gone or its bytes changed (the key differs).
    """
    ref = ModelRef.from_dict(stored)
    if ref.family == "calculator":
        raise ModelError(
            f"the results were made with a user calculator ({ref.calculator_id}); it cannot be "
            "reloaded from the store: pass the model again (--model or calculator=)"
        )
    if ref.weights_path is not None and not ref.weights_path.is_file():
        key = f" (key {stored['key']})" if stored.get("key") else ""
        raise ModelError(f"the model these results were made with is gone: {ref.weights_path}{key}; "
                         "if the file moved, pass its new path with --model (accepted when its "
                         "content key is that one)")
    if stored.get("key") and ref.key != stored["key"]:
        raise ModelError(
            f"the weights of {ref.label} changed since these results were made "
            f"(key {stored['key']} then, {ref.key} now); restore them, pass the original file's new "
            "path with --model, or rerun the search with the new weights"
        )
    return ref


def check_moved(stored: dict[str, Any], spec: str | ModelRef, device: str = "cpu") -> ModelRef:
    """The model ``spec`` names, standing in for the one a stored result was made with.

    A weights file moved or renamed after a search keeps its content key, so ``--model NEWPATH``
    can point the search's results at it; a file with other weights is another model and is
    refused: the stored energies were made with the stored model, so a phonon, chemical
    potential or MD of another model would not match them. A user calculator's results (and a
    reference without a key) have no key to compare: ``spec`` is then taken as given.

    Args:
        stored: The stored reference (:meth:`ModelRef.to_dict`, with its ``key``).
        spec: ``--model`` text (a weights file or a built-in name) or a :class:`ModelRef`.
        device: ``cpu`` or ``cuda``.

    Raises:
        ModelError: ``spec`` names no loadable model, or a model whose key is not the stored one.
    """
    ref = parse_model(spec, device)
    want = stored.get("key")
    if stored.get("family") == "calculator" or not want:
        return ref
    if ref.key != want:
        made = ModelRef.from_dict(stored).label
        raise ModelError(
            f"--model {ref.label} is not the model these results were made with: its key is {ref.key}, "
            f"theirs {want} ({made}); pass that model's file, or rerun the search with this one"
        )
    return ref
