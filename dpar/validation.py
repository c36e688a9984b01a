"""Allowed values, declared once next to each default, checked before any work.

A config dataclass field declares its range or its choices in its metadata::

    lr: float = ranged(1e-4, gt=0)                        # > 0
    dropout_p: float = ranged(0.1, min=0, lt=1)           # in [0, 1)
    max_patch_length: int | None = ranged(4, min=1)       # >= 1, or null
    mixed_precision: str = choice("bf16", ("no", "bf16"))

A rule between fields lives in one ``check(self, key)`` method of the schema that holds them (e.g.
``dpar.models.ModelConfig.check``: ``image_size`` a multiple of ``downsample_size``); ``key`` names a field
as the user wrote it, a config key (``model.image_size``, :func:`config_key`) or a script's flag
(``--image-size``, :func:`flag_key`), and a broken rule is a :class:`~dpar.errors.UserError` naming the key,
the value and what is allowed.

``dpar.config`` checks every field of every loaded config (file, overrides and saved runs alike), then runs
:func:`check_schema`: the ``check`` of every section that has one, then the schema's own. A script's flag uses
the same field rule as its argparse type (``type=number(int, min=1)``), and flags that fill a schema are
checked by its ``check`` too (:func:`check_flags`). Every float must be finite (no nan, no inf). A value
outside its rule is one line naming the key or flag, the value and what is allowed, raised before any file is
written. What only a programmer can break (arguments between library functions) is an ``assert``. Standard
library only, so that any script may use it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

# The largest image a config or flag may describe: sides of at most 2048 px and 16,384 tokens (a 128 x 128 token
# grid). LlamaGen's largest are 512 px and 1,024 tokens at 16x, 4,096 at 8x. Beyond these bounds one image's KV
# caches or tokenizer activations take many GB (at 65536 px: terabytes), so such a value is refused, not tried.
MAX_IMAGE_SIZE = 2048
MAX_IMAGE_TOKENS = 128 * 128

# YAML 1.1 reads these words as booleans; a string choice spelled so gets its spelling back.
_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


@dataclass(frozen=True)
class Range:
    """Bounds of a number: ``min``/``max`` inclusive, ``gt``/``lt`` exclusive; always finite."""
    min: float | None = None
    gt: float | None = None
    max: float | None = None
    lt: float | None = None

    def allows(self, value: float) -> bool:
        return (math.isfinite(value) and (self.min is None or value >= self.min)
                and (self.gt is None or value > self.gt) and (self.max is None or value <= self.max)
                and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        low = None if self.min is None and self.gt is None else \
            ("[", self.min) if self.min is not None else ("(", self.gt)
        high = None if self.max is None and self.lt is None else \
            ("]", self.max) if self.max is not None else (")", self.lt)
        if low and high:
            return f"in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
        if low:
            return f"{'>=' if low[0] == '[' else '>'} {_number(low[1])}"
        if high:
            return f"{'<=' if high[0] == ']' else '<'} {_number(high[1])}"
        return "a finite number"

    def demand(self, value: float) -> str:
        """What a value outside the range must be: :meth:`describe`, saying "finite" to an inf or nan."""
        bounds = self.describe()
        if math.isfinite(value) or bounds == "a finite number":
            return bounds
        return f"a finite number {bounds}"


def ranged(default: Any, **bounds: float) -> Any:
    """A dataclass field with this default and a :class:`Range` (None passes when the field may be null)."""
    return dataclasses.field(default=default, metadata={"range": Range(**bounds)})


def choice(default: str, choices: Sequence[str]) -> Any:
    """A dataclass field with this default, allowed only the given strings."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def problem(value: Any, metadata: dict) -> str | None:
    """What is wrong with ``value`` under a field's metadata (``range`` / ``choices``), or None."""
    if value is None:
        return None
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        hint = " (YAML reads yes/no/on/off/true/false as a boolean)" if value in ("True", "False") else ""
        return f"must be one of: {', '.join(map(str, choices))}; got {value!r}{hint}"
    rule = metadata.get("range")
    if rule is not None and isinstance(value, Sequence) and not isinstance(value, str):  # each within the range
        if not value:
            return f"must be a non-empty list of numbers {rule.describe()}; got []"
        issues = [problem(item, metadata) for item in value]
        bad = next((issue for issue in issues if issue), None)
        return None if bad is None else f"{bad.split('; got')[0]} in every entry; got {list(value)!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be {rule.demand(value) if rule else 'a finite number'}; got {value!r}"
    if rule is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and not rule.allows(value):
        return f"must be {rule.describe()}; got {value!r}"
    return None


def yaml_bool_spelling(value: Any, choices: Sequence[str]) -> Any:
    """``no`` in YAML is False, which a string field stores as 'False': give a string choice its spelling back."""
    text = {"True": True, "False": False}.get(value) if isinstance(value, str) else value
    if isinstance(text, bool):
        for word in _YAML_BOOL_WORDS[text]:
            if word in choices:
                return word
    return value


def number(kind: type, **bounds: float) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind`` (int or float) within a :class:`Range`, e.g. ``number(int, min=1)``."""
    rule = Range(**bounds)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            bounds = rule.describe()
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}"
                                             f"{'' if bounds == 'a finite number' else ' ' + bounds}; "
                                             f"got {text!r}") from None
        if not rule.allows(value):
            raise argparse.ArgumentTypeError(f"must be {rule.demand(value)}; got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def device(text: str) -> str:
    """An argparse ``type`` for ``--device``: ``cpu``, ``cuda`` or ``cuda:N``, CUDA only where torch sees it."""
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N; got {text!r}")
    if text.startswith("cuda"):
        import torch
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(match.group(1) or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees {count} CUDA device(s) here")
    return text


def path(text: str) -> Path:
    """An argparse ``type`` for a path flag: ``Path(text)``, refusing the empty string (which ``Path`` would
    silently read as the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("must be a path; got ''")
    return Path(text)


def epoch_choice(text: str) -> int | str:
    """An argparse ``type`` for ``--epoch``: an epoch number >= 0 or ``latest``."""
    if text == "latest":
        return text
    try:
        return number(int, min=0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an epoch number >= 0 or 'latest'; got {text!r}") from None


def field_type(schema: type, name: str) -> Callable[[str], Any]:
    """The argparse ``type`` of a flag that sets dataclass field ``name``: its kind and its declared range."""
    field = next(f for f in dataclasses.fields(schema) if f.name == name)
    return number(type(field.default), **dataclasses.asdict(field.metadata.get("range", Range())))


Key = Callable[[str], str]
"""How a schema's ``check`` names a field (dotted below a section: ``"data.image_size"``) to the user."""


def config_key(section: str = "") -> Key:
    """Fields named as config keys of ``section``: ``config_key("model")("image_size") == "model.image_size"``."""
    return lambda name: f"{section}.{name}" if section else name


def flag_key(flags: dict[str, str]) -> Key:
    """Fields named by the flags that set them (``{"image_size": "--image-size"}``); any other by its field name."""
    return lambda name: flags.get(name, name)


def check_schema(config: Any, key: Key = config_key()) -> None:
    """The rules between fields of a config dataclass instance: ``check(key)`` of every section (a dataclass
    field) that defines one, innermost first, then ``config.check(key)`` where defined. A section's fields are
    named ``key("section.field")``. Raises what a ``check`` raises (a one-line ``UserError``)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_schema(value, lambda name, section=field.name: key(f"{section}.{name}"))
    check = getattr(config, "check", None)
    if check is not None:
        check(key)


def check_flags(config: Any, flags: dict[str, str]) -> None:
    """:func:`check_schema` of a config a script filled from its own flags (``{field: flag}``), so that a broken
    rule names the flags: ``--image-size 30 is not a multiple of --downsample 4``."""
    check_schema(config, flag_key(flags))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)

