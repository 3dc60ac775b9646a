"""Plain data <-> frozen config dataclasses, type-checked; the converters every part uses.

``from_dict`` builds a dataclass from parsed YAML or JSON, checking every key and
type: an unknown key fails loudly and names the nearest valid one; a tagged union
(feature specs, objectives, networks) is told apart by its ``kind``; a field that a
dataclass renamed (its ``RENAMED``: old -> new name, or old -> a value of another field)
is still read under its old name, with a warning, so configs saved before the rename
load. ``to_dict`` is its inverse, ``apply_overrides`` sets ``dotted.key=value`` strings
and ``set_value`` one parsed value. This module imports nothing of the pipeline, so
reading or writing a config never builds, or even imports, a model.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from twotower.errors import ConfigError

log = logging.getLogger(__name__)

T = typing.TypeVar("T")


def read_yaml(path: Path, what: str) -> Any:
    """The parsed contents of a YAML file; a missing or malformed one is a ``ConfigError``
    naming the file (``what``: e.g. "config", "search space")."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def apply_overrides(config: T, overrides: typing.Sequence[str]) -> T:
    """Returns ``config`` with each ``dotted.key=value`` override applied and type-checked."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        value = yaml.safe_load(text) if text else ""
        config = set_value(config, key, value, where=f"--set {key}")
    return config


def set_value(config: T, key: str, value: Any, where: str) -> T:
    """Returns ``config`` with the field at ``dotted.key`` set to ``value``, type-checked.

    The one path every override takes (``--set``, a tuner's trial): a feature is selected
    by its name, an unknown key fails and names the nearest valid one.

    Args:
        config: a config dataclass.
        key: e.g. ``"training.lr"`` or ``"features.query.history.max_len"``.
        value: the new value, already parsed (a float, a list, ...).
        where: what error messages start with, e.g. ``"--set training.lr"``.
    """
    # a tagged section's "kind" (e.g. training.objective.kind=hinge) switches it
    # to that kind with its defaults; later overrides then set its fields
    return _replace_path(config, key.split("."), value, where=where)


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-ready form of a config.

    Paths become absolute strings: a relative path in a config built in code (the demo's
    ``--out runs/demo``) means "from the working directory of now", so every config
    written (a run's ``config.yaml``, a checkpoint, an artifact's manifest) names the
    same files when it is read back from another directory.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj.absolute())
    return obj


def from_dict(cls: type, raw: Any, where: str, base_dir: Path = Path(".")) -> Any:
    """Builds dataclass ``cls`` from plain data, checking every key and type.

    Args:
        cls: a dataclass type (or any annotation this module understands).
        raw: the parsed YAML value.
        where: a dotted location used in error messages.
        base_dir: the folder that relative paths are resolved against.
    """
    return _convert(cls, raw, where, base_dir)


def _convert(tp: Any, value: Any, where: str, base_dir: Path) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(tp, value, where, base_dir)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp)
        items = [_convert(item_tp, v, f"{where}[{i}]", base_dir) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(val_tp, v, f"{where}.{k}", base_dir) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where, base_dir)
    return _convert_scalar(tp, value, where, base_dir)


def _convert_union(tp: Any, value: Any, where: str, base_dir: Path) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None:
        if len(args) < len(typing.get_args(tp)):
            return None
        raise ConfigError(f"{where}: a value is required")
    tagged = [a for a in args if dataclasses.is_dataclass(a) and "kind" in _field_types(a)]
    if tagged:
        return _convert_tagged(tagged, value, where, base_dir)
    errors = []
    for arg in args:
        try:
            return _convert(arg, value, where, base_dir)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")


def _convert_tagged(options: list[type], value: Any, where: str, base_dir: Path) -> Any:
    """A union of dataclasses told apart by their ``kind`` field (e.g. feature specs)."""
    by_kind = {typing.get_args(_field_types(c)["kind"])[0]: c for c in options}
    if not isinstance(value, dict) or "kind" not in value:
        raise ConfigError(f"{where}: expected a mapping with a 'kind' (one of {sorted(by_kind)})")
    kind = value["kind"]
    if kind not in by_kind:
        raise ConfigError(f"{where}.kind: unknown kind {kind!r}{_nearest(kind, by_kind)}")
    return _convert_dataclass(by_kind[kind], value, where, base_dir)


def _convert_dataclass(cls: type, value: Any, where: str, base_dir: Path) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(
            f"{where or 'top level'}: expected a mapping for {cls.__name__}, got {value!r}"
        )
    hints = _field_types(cls)
    value = _renamed(cls, value, where)
    for key in value:
        if key not in hints:
            place = f"{where}: unknown key" if where else "unknown top-level key"
            raise ConfigError(f"{place} {key!r}{_nearest(str(key), hints)}")
    kwargs = {
        key: _convert(hints[key], val, f"{where}.{key}" if where else key, base_dir)
        for key, val in value.items()
    }
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without a default
        raise ConfigError(f"{where}: {err}") from None
    except ValueError as err:  # a dataclass's own __post_init__ check
        raise ConfigError(f"{where}: {err}") from None


def _renamed(cls: type, value: dict, where: str) -> dict:
    """``value`` with the keys a dataclass has renamed (its ``RENAMED``) given their new
    names, so configs saved before a rename still load.

    A ``RENAMED`` entry is ``old: new`` (the same value under a new name), or ``old:
    (field, {old value: field value})``: a setting now written as a value of another
    field (``_respell``).
    """
    renamed: dict[str, Any] = getattr(cls, "RENAMED", {})
    old = [key for key in value if key in renamed]
    if not old:
        return value
    value = dict(value)
    for key in old:
        if not isinstance(renamed[key], str):
            _respell(cls, key, value, where)
            continue
        new = renamed[key]
        if new in value:
            raise ConfigError(f"{where}: {key!r} is the old name of {new!r}; give only {new!r}")
        log.warning("%s: %r is now called %r", where or "config", key, new)
        value[new] = value.pop(key)
    return value


def _respell(cls: type, key: str, value: dict, where: str) -> None:
    """Writes the old ``key`` of ``value`` as the other field's value it now is.

    Where that field is given too, a default gives way: the field keeps its own value
    where the old key's means the default (``one_pass: false`` beside ``examples:
    queries``), and takes the old key's where its own is the default (a config saved
    with both).
    """
    old = value.pop(key)
    field, new = _respelled(cls.RENAMED[key], key, old, where)
    default = next(f.default for f in dataclasses.fields(cls) if f.name == field)
    given = value.get(field, default)
    spelled, place = f"{key}: {_plain(old)}", where or "config"
    if given in (new, default):
        log.warning("%s: %r is now written %r", place, spelled, f"{field}: {_plain(new)}")
        value[field] = new
    elif new == default:
        log.warning("%s: %r is no longer read (%r says it)", place, spelled, f"{field}: {given}")
    else:
        raise ConfigError(
            f"{where}: {spelled!r} is now written '{field}: {_plain(new)}', which "
            f"contradicts '{field}: {_plain(given)}'; give only {field!r}"
        )


def _respelled(rule: tuple[str, dict], key: str, old: Any, where: str) -> tuple[str, Any]:
    """The field and value an old key's value is now written as (a ``RENAMED`` entry
    ``(field, {old value: field value})``)."""
    field, values = rule
    for before, after in values.items():
        if type(old) is type(before) and old == before:
            return field, after
    place = f"{where}.{key}" if where else key
    choices = ", ".join(_plain(v) for v in values)
    raise ConfigError(f"{place}: expected one of {choices}, got {old!r}")


def _plain(value: Any) -> str:
    """A value as YAML spells it (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _convert_scalar(tp: Any, value: Any, where: str, base_dir: Path) -> Any:
    if tp is Any:
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        path = Path(value).expanduser()
        # absolute, so a run's saved config finds its data from any working directory
        return path if path.is_absolute() else (base_dir / path).absolute()
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp in (int, float, str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def _replace_path(obj: Any, keys: list[str], value: Any, where: str) -> Any:
    """Returns a copy of ``obj`` with the field at ``keys`` set to ``value``."""
    head, rest = keys[0], keys[1:]
    if isinstance(obj, list):  # a list of named specs: select the element by its name
        names = [getattr(item, "name", None) for item in obj]
        if head not in names:
            raise ConfigError(f"{where}: no entry named {head!r}{_nearest(head, names)}")
        i = names.index(head)
        if not rest:
            raise ConfigError(f"{where}: name a field of {head!r} to override")
        return [*obj[:i], _replace_path(obj[i], rest, value, where), *obj[i + 1 :]]
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{where}: {head!r} is not a section")
    hints = _field_types(type(obj))
    head, value = _current_key(type(obj), head, bool(rest), value, where)
    if head not in hints:
        raise ConfigError(f"{where}: unknown key {head!r}{_nearest(head, hints)}")
    if rest == ["kind"] and _is_tagged_union(hints[head]):
        # switching kind (an objective, a network) starts from that kind's defaults
        current = getattr(obj, head)
        kept = current.kind == value
        new = current if kept else _convert(hints[head], {"kind": value}, where, Path.cwd())
    elif rest:
        new = _replace_path(getattr(obj, head), rest, value, where)
    else:
        new = _convert(hints[head], value, where, Path.cwd())
    try:
        return dataclasses.replace(obj, **{head: new})
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _current_key(cls: type, head: str, deeper: bool, value: Any, where: str) -> tuple[str, Any]:
    """The field an override's ``head`` names today and the value it sets: a renamed
    key's new name, or the field and value an old key is now written as (``RENAMED``).
    ``deeper``: the override goes on past ``head``."""
    rule = getattr(cls, "RENAMED", {}).get(head)
    if rule is None or isinstance(rule, str):
        return next(iter(_renamed(cls, {head: None}, where))), value
    if deeper:
        raise ConfigError(f"{where}: {head!r} is not a section")
    field, new = _respelled(rule, head, value, where)
    log.warning(
        "%s: %r is now written %r", where, f"{head}={_plain(value)}", f"{field}={_plain(new)}"
    )
    return field, new


def _is_tagged_union(tp: Any) -> bool:
    """A union of dataclasses told apart by ``kind`` (feature specs, objectives, networks)."""
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return False
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return all(dataclasses.is_dataclass(a) and "kind" in _field_types(a) for a in args)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _nearest(key: str, valid: typing.Iterable[Any]) -> str:
    names = [str(v) for v in valid if v is not None]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (valid: {', '.join(sorted(names))})"
