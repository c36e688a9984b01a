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

One reading for every config file, a training config or a run's saved ``config.yaml``
(:func:`read_config_file`, :func:`read_section`): YAML aliases (``*name``) are refused (a few hundred bytes
of nested aliases would expand to billions of nodes), every ``${...}`` is resolved (an error is one line
naming the file and the key) and the values are then literal: OmegaConf's escape ``\\${`` stands for a
literal ``${``, and ``save_config`` writes such a value escaped, so a saved run reads back as it was. Text
typed on the command line for a text field (a path, a name) is taken as typed, ``${`` included.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import textwrap
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.nodes import BooleanNode
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
    dotlist = [_keep_text(schema, item) for item in parse_overrides(overrides)]
    if dotlist:
        config = _merge(config, _create(lambda: OmegaConf.from_dotlist(dotlist), "on the command line: "), "")
    where = f"in {path}: " if path is not None else ""
    overridden = {item.partition("=")[0] for item in dotlist}  # their errors are the command line's, not the file's
    config = _merge(OmegaConf.structured(schema), _resolved(config, where, overridden), where)
    _validate(config, schema, "", "set it in the YAML or with --{key} ...")
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
    """Write the fully resolved config as YAML, atomically; a literal ``${`` in a value is written escaped
    (``\\${``), so that the file reads back as the same values."""
    atomic_write_text(path, OmegaConf.to_yaml(_resolved(config, f"writing {path}: ")))


def read_config_file(path: str | Path) -> DictConfig:
    """A config file (a run's ``config.yaml``) as it stands, without a schema: :func:`read_yaml`, then every
    interpolation resolved; its values are literal from here on. :class:`ConfigError`, one line naming the file
    and the key, for an interpolation that does not resolve (a missing key, an unset ``oc.env``, a cycle, an
    unknown resolver)."""
    return _resolved(read_yaml(path), f"in {path}: ")


def read_section(path: str | Path, key: str, schema: type, *, required: bool = True) -> Any:
    """One section of a saved config (e.g. a run's ``model``), read as :func:`read_config_file` reads the file
    and validated against ``schema`` as :func:`load_config` validates (its fields' rules, values that are
    missing, then its ``check``), as a dataclass; None for an absent section unless ``required``.
    :class:`ConfigError` naming the file and the key."""
    node = read_config_file(path).get(key)
    if node is None and not required:
        return None
    if node is None:
        raise ConfigError(f"{path} has no {key!r} section")
    if not isinstance(node, DictConfig):
        raise ConfigError(f"in {path}: {key!r} must be a section of keys (a mapping), got {_short(node)}")
    missing = sorted(OmegaConf.missing_keys(node))  # full keys; merged into the schema, ??? would keep the default
    if missing:
        raise ConfigError(f"in {path}: config key {missing[0]!r} needs a value (set it in the file)")
    node = _upgraded(schema, node)
    config = _merge(OmegaConf.structured(schema), node, f"in {path}: ", key + ".")
    try:
        return to_dataclass(_validate(config, schema, key + ".", "set it in the file"))
    except UserError as error:  # the one line gains the file it is about
        raise ConfigError(f"in {path}: {error}") from None


def load_record(schema: type, path: str | Path) -> DictConfig:
    """A run's saved config, every section, read as :func:`read_section` reads one (each section upgraded by
    its schema, then validated as :func:`load_config` validates). ``ConfigError`` naming the file."""
    tree = read_config_file(path)
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        if isinstance(tree.get(field.name), DictConfig):
            tree[field.name] = _upgraded(hints[field.name], tree[field.name])
    config = _merge(OmegaConf.structured(schema), tree, f"in {path}: ")
    try:
        return _validate(config, schema, "", "set it in the file")
    except UserError as error:
        raise ConfigError(f"in {path}: {error}") from None


def _upgraded(schema: type, node: DictConfig) -> DictConfig:
    """A recorded section as this version reads it: a schema may define ``upgrade_record(section: dict) ->
    dict`` for what earlier versions recorded otherwise (e.g. :meth:`dpar.models.ModelConfig.upgrade_record`)."""
    upgrade = getattr(schema, "upgrade_record", None)
    return node if upgrade is None else OmegaConf.create(upgrade(OmegaConf.to_container(node)))


def literal(text: str) -> str:
    """``text`` as a config value that reads back as ``text``: each ``${`` escaped as OmegaConf reads escapes
    (``\\${`` is a literal ``${``; backslashes just before it are doubled). For a path or a name put into a
    config by code or typed on the command line."""
    return _INTERPOLATION.sub(lambda match: match.group(1) * 2 + "\\${", text)


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
    """A YAML mapping, interpolations left as written; ``base: other.yaml`` (relative to this file) starts it
    from another config file. YAML aliases are refused (:class:`ConfigError` naming the file and the line)."""
    path = Path(path)
    if not path.is_file():
        where = f" (the base of {_children[-1]})" if _children else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        loaded = yaml.load(path.read_text(), Loader=_NoAliasLoader)
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not a UTF-8 text file ({error.reason})") from None
    except _AliasFound as error:
        raise ConfigError(f"{path}, line {error.line}: YAML aliases ({error.alias}) are not allowed in config "
                          f"files; write the values out (or start from another file with {BASE_KEY}: ...)") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {first_line(error)}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
    base = loaded.pop(BASE_KEY, None)
    node = _create(lambda: OmegaConf.create(loaded), f"in {path}: ")
    if base is None:
        return node
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {BASE_KEY!r} must be the path of another config file, got {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in {child.resolve() for child in (*_children, path)}:
        raise ConfigError(f"{path}: {BASE_KEY!r} chain returns to {base_path}")
    return OmegaConf.merge(read_yaml(base_path, (*_children, path)), node)


class _AliasFound(yaml.YAMLError):
    def __init__(self, alias: str, line: int):
        super().__init__(alias)
        self.alias, self.line = alias, line


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (``*name``, also in ``<<: *name``) as it meets them: no node is
    shared, so nothing can expand (OmegaConf copies every shared node)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasFound(f"*{event.anchor}", event.start_mark.line + 1)
        return super().compose_node(parent, index)


_INTERPOLATION = re.compile(r"(\\*)\$\{")


def _escaped(value: Any) -> Any:
    """A plain (resolved) config tree with every string :func:`literal`."""
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    return literal(value) if isinstance(value, str) else value


def _resolved(config: DictConfig, where: str, overridden: set[str] | frozenset[str] = frozenset()) -> DictConfig:
    """``config`` with every interpolation resolved and every value literal (a ``${`` the resolving produced,
    from OmegaConf's escape ``\\${``, escaped again: OmegaConf's own ``resolve`` would read it as a new
    interpolation). :class:`ConfigError` naming ``where`` (not for the ``overridden`` keys) and the key."""
    try:
        tree = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as error:
        full_key = getattr(error, "full_key", None)
        where = "" if full_key in overridden else where
        key = f" key {full_key!r}" if full_key else ""
        raise ConfigError(f"{where}cannot resolve config{key}: {first_line(error)}") from None
    except RecursionError:
        raise ConfigError(f"{where}cannot resolve config: interpolations nest too deeply") from None
    return _create(lambda: OmegaConf.create(_escaped(tree)), where)


def _create(make, where: str) -> DictConfig:
    """``make()`` (an OmegaConf constructor); an interpolation that cannot be parsed is a :class:`ConfigError`."""
    try:
        return make()
    except OmegaConfBaseException as error:
        key = f" key {error.full_key!r}" if getattr(error, "full_key", None) else ""
        raise ConfigError(f"{where}invalid config{key}: {first_line(error)}") from None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _validate(config: DictConfig, schema: type, prefix: str, hint: str) -> DictConfig:
    """Every field's rule (:func:`_check_values`), then values that are missing (``???``; ``hint`` tells where
    to set one, ``{key}`` standing for the key), then the schema's ``check`` with full keys. Returns
    ``config``."""
    _check_values(config, schema, prefix)
    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        key = prefix + missing[0]
        raise ConfigError(f"config key {key!r} needs a value ({hint.format(key=key)})")
    check_schema(to_dataclass(config), config_key(prefix.rstrip(".")))
    return config


def _merge(config: DictConfig, update: DictConfig, where: str, prefix: str = "") -> DictConfig:
    """``config`` updated by ``update``; an unknown key, a value of the wrong type or a section given something
    other than keys is a :class:`ConfigError` (keys named with ``prefix``, the section ``config`` is)."""
    _check_sections(config, update, where, prefix)
    try:
        return OmegaConf.merge(config, update)
    except ConfigKeyError as error:
        key = error.full_key or str(error.key)
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(config, parent) if parent else config
        valid = ", ".join(node.keys()) if isinstance(node, DictConfig) else "none"
        raise ConfigError(f"{where}unknown config key {prefix + key!r}; valid keys"
                          f"{f' under {prefix + parent!r}' if parent else ''}: {valid}") from None
    except ValidationError as error:
        key = f"config key {prefix + error.full_key!r}: " if error.full_key else ""
        raise ConfigError(f"{where}{key}{first_line(error)}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}invalid config: {first_line(error)}") from None


def _check_sections(config: DictConfig, update: DictConfig, where: str, prefix: str) -> None:
    """A section of the schema (``model``) given something other than keys (``model: 5``), or a yes/no key given a
    number (``train.fsdp=2``): one line."""
    for key in update.keys() if isinstance(update, DictConfig) else ():
        node = config._get_node(key) if key in config else None
        if isinstance(node, BooleanNode) and not OmegaConf.is_interpolation(update, key):
            value = update._get_node(key)._value()
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # OmegaConf reads 2 as true
                raise ConfigError(f"{where}config key {prefix + str(key)!r} must be true or false; got {_short(value)}")
        if not isinstance(node, DictConfig) or OmegaConf.is_interpolation(update, key):
            continue
        value = update._get_node(key)
        if not isinstance(value, DictConfig):
            got = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value._value()
            raise ConfigError(f"{where}{prefix + str(key)!r} must be a section of keys (a mapping), got {_short(got)}")
        _check_sections(node, value, where, f"{prefix}{key}.")


def _keep_text(schema: type, item: str) -> str:
    """``key=value`` with the value quoted when ``key`` is a text field: on the command line a path or a name
    is the text typed (``--data.store 0777`` stays ``"0777"``, not YAML's 511; ``tok${x}`` stays ``tok${x}``, not
    an interpolation), ``null`` aside."""
    key, _, value = item.partition("=")
    kind: Any = schema
    for part in key.split("."):
        hints = typing.get_type_hints(kind) if dataclasses.is_dataclass(kind) else {}
        kind = hints.get(part)
    text_field = kind is str or (typing.get_args(kind) and set(typing.get_args(kind)) == {str, type(None)})
    if not text_field or value in ("null", "~"):
        return item
    if value[:1] in "'\"" and value[-1:] == value[:1] and len(value) > 1:  # quoted on the command line: the
        try:                                                               # text within YAML's quotes
            value = str(yaml.safe_load(value))
        except yaml.YAMLError:
            pass
    return f"{key}='" + literal(value).replace("'", "''") + "'"


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
