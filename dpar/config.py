"""Configs: a dataclass schema, a YAML file and command-line overrides, merged and validated.

Every script takes ``--config FILE.yaml`` plus overrides in either form::

    --model.gpt_model DGPT-L      (reference README style)
    model.gpt_model=DGPT-L        (OmegaConf dotlist style; ``--model.gpt_model=DGPT-L`` too)

Values are parsed as YAML (``null``, ``true``, numbers; ``no`` given to a string choice such as
``mixed_precision`` stays ``"no"``). An unknown key, a value of the wrong type or a value outside the
choices or range its field declares (:mod:`dpar.validation`) is a :class:`ConfigError` whose one-line
message names the key, the value and what is valid; then every section's ``check`` (the rules between its
fields, :func:`dpar.validation.check_schema`) runs, its one line naming the full key (``model.image_size``).
A YAML file may begin with ``base: other.yaml`` to start from another file and change only some keys.
``save_config`` writes the fully resolved config atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import UserError, first_line
from .fileio import atomic_write_text
from .validation import check_schema, config_key, problem, yaml_bool_spelling


BASE_KEY = "base"
REPO = Path(__file__).resolve().parents[1]  # the repository (an editable install's source tree)


class ConfigError(UserError):
    """An invalid config file, key or value."""


def parse_overrides(args: Sequence[str]) -> list[str]:
    """Turn ``--a.b value``, ``--a.b=value`` and ``a.b=value`` into an OmegaConf dotlist."""
    dotlist, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key = arg[2:]
            if "=" in key:
                dotlist.append(key)
            elif i + 1 < len(args) and not (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
                dotlist.append(f"{key}={args[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"missing value for override --{key}")
        elif "=" in arg:
            dotlist.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --a.b value or a.b=value")
        i += 1
    return dotlist


def load_config(schema: type, path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file <- overrides; validated (each field's rule, missing values, then the
    schema's and its sections' ``check``)."""
    config = OmegaConf.structured(schema)
    if path is not None:
        config = _merge(config, read_yaml(path), f"in {path}: ")
    if overrides:
        dotlist = [_keep_text(schema, item) for item in parse_overrides(overrides)]
        config = _merge(config, OmegaConf.from_dotlist(dotlist), "")
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as error:
        raise ConfigError(f"cannot resolve config: {first_line(error)}") from None
    _check_values(config, schema, "")
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise ConfigError(f"config key {missing[0]!r} needs a value (set it in the YAML or with --{missing[0]} ...)")
    check_schema(to_dataclass(config))
    return config


def parse_cli(parser: argparse.ArgumentParser, schema: type,
              argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, DictConfig]:
    """Parse a script's own flags with ``parser``; everything else configures ``schema``.

    Adds ``--config`` unless the parser has it. Returns the script flags and the validated config.
    """
    if not any("--config" in action.option_strings for action in parser._actions):
        parser.add_argument("--config", help="YAML config file (overrides follow as --a.b value or a.b=value)")
    parser.allow_abbrev = False
    parser.epilog = "\n".join(filter(None, [parser.epilog, config_sections_help(schema)]))
    args, rest = parser.parse_known_args(argv)
    return args, load_config(schema, args.config, rest)


def config_sections_help(schema: type) -> str:
    """The ``--help`` text that lists a script's config sections, their keys and where each is documented."""
    lines = [textwrap.fill("config sections: set any key as --section.key VALUE or section.key=VALUE; each key is "
                           "commented, with its default and allowed values, where its section is defined:", width=100)]
    hints = typing.get_type_hints(schema)
    plain = [f.name for f in dataclasses.fields(schema) if not dataclasses.is_dataclass(hints[f.name])]
    if plain:
        lines.append(f"  top-level keys: {', '.join(plain)}")
    for section in dataclasses.fields(schema):
        section_type = hints[section.name]
        if section.name in plain:
            continue
        shared = [f"{base.__name__} in {_source(base)}" for base in section_type.__mro__[1:]
                  if dataclasses.is_dataclass(base)]  # a base schema's keys are commented where it is defined
        lines.append(f"  {section.name}: {section_type.__name__} in {_source(section_type)}"
                     + (f" (shared keys: {', '.join(shared)})" if shared else ""))
        lines.append(textwrap.fill(", ".join(f.name for f in dataclasses.fields(section_type)), width=100,
                                   initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _source(schema: type) -> Path:
    source = Path(inspect.getsourcefile(schema)).resolve()
    return source.relative_to(REPO) if source.is_relative_to(REPO) else source


def save_config(config: DictConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML, atomically."""
    atomic_write_text(path, OmegaConf.to_yaml(config, resolve=True))


def read_section(path: str | Path, key: str, schema: type) -> Any:
    """One section of a saved config (e.g. a run's ``model``) validated against ``schema`` (its fields' rules,
    then its ``check``), as a dataclass. :class:`ConfigError` naming the file and the key."""
    node = read_yaml(path).get(key)
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} has no {key!r} section")
    config = _merge(OmegaConf.structured(schema), node, f"in {path}, section {key!r}: ")
    try:
        _check_values(config, schema, key + ".")
        section = to_dataclass(config)
        check_schema(section, config_key(key))
    except UserError as error:  # the one line gains the file it is about
        raise ConfigError(f"in {path}: {error}") from None
    return section


def recorded_path(value: str | Path) -> Path:
    """A path a run's ``config.yaml`` records, found from any working directory: an absolute path as is; a
    relative one from the current directory where it exists there (a run started here), else from the
    repository (the embedded demo's runs record their paths relative to it)."""
    path = Path(value)
    if path.is_absolute() or path.exists() or not (REPO / path).exists():
        return path
    return REPO / path


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b": value}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_dataclass(config: DictConfig) -> Any:
    """The config as an instance of its schema dataclass (plain attribute access, no OmegaConf nodes)."""
    return OmegaConf.to_object(config)


def read_yaml(path: str | Path, _children: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML mapping; ``base: other.yaml`` (relative to this file) starts it from another config file."""
    path = Path(path)
    if not path.is_file():
        where = f" (the base of {_children[-1]})" if _children else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not a UTF-8 text file ({error.reason})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {first_line(error)}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
    base = loaded.pop(BASE_KEY, None)
    node = OmegaConf.create(loaded)
    if base is None:
        return node
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {BASE_KEY!r} must be the path of another config file, got {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in {child.resolve() for child in (*_children, path)}:
        raise ConfigError(f"{path}: {BASE_KEY!r} chain returns to {base_path}")
    return OmegaConf.merge(read_yaml(base_path, (*_children, path)), node)


def _merge(config: DictConfig, update: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(config, update)
    except ConfigKeyError as error:
        key = error.full_key or str(error.key)
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(config, parent) if parent else config
        valid = ", ".join(node.keys()) if isinstance(node, DictConfig) else "none"
        raise ConfigError(f"{where}unknown config key {key!r}; valid keys"
                          f"{f' under {parent!r}' if parent else ''}: {valid}") from None
    except ValidationError as error:
        key = f"config key {error.full_key!r}: " if error.full_key else ""
        raise ConfigError(f"{where}{key}{first_line(error)}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}invalid config: {first_line(error)}") from None


def _keep_text(schema: type, item: str) -> str:
    """``key=value`` with the value quoted when ``key`` is a text field: on the command line a path or a name
    is the text typed (``--data.store 0777`` stays ``"0777"``, not YAML's 511), ``null`` aside."""
    key, _, value = item.partition("=")
    kind: Any = schema
    for part in key.split("."):
        hints = typing.get_type_hints(kind) if dataclasses.is_dataclass(kind) else {}
        kind = hints.get(part)
    text_field = kind is str or (typing.get_args(kind) and set(typing.get_args(kind)) == {str, type(None)})
    if not text_field or value in ("null", "~") or (value[:1] in "'\"" and value[-1:] == value[:1] and len(value) > 1):
        return item
    return f"{key}='" + value.replace("'", "''") + "'"


def _check_values(config: DictConfig, schema: type, prefix: str) -> None:
    """Every field against its declared choices or range (:mod:`dpar.validation`), sections recursively."""
    for field in dataclasses.fields(schema):
        if OmegaConf.is_missing(config, field.name):
            continue  # reported by load_config, after all overrides
        value = config[field.name]
        key = prefix + field.name
        if "choices" in field.metadata:
            value = yaml_bool_spelling(value, field.metadata["choices"])
            config[field.name] = value
        issue = problem(value, field.metadata)
        if issue is not None:
            raise ConfigError(f"config key {key!r} {issue}")
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
            _check_values(value, OmegaConf.get_type(value), key + ".")
