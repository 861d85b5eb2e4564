"""YAML configs mapped to typed dataclasses, validated at load; any key overridable.

    cfg = load_config(SFTConfig, "examples/tiny/sft.yaml", ["optim.lr=2e-5", "data.max_tokens=4096"])

Errors name the file and the dotted key (with a suggestion for a misspelt one). Nested dataclass
fields are sections; a section's keys override its parent's default for it (a field declared
`sampling: SamplingParams = field(default_factory=lambda: SamplingParams(parallel=False))` keeps
`parallel: false` unless the YAML sets it). A dataclass's own `__post_init__` checks run after
loading and their message is reported with the section's key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config: the message names the source (file or override) and the key."""


def _convert(value: Any, hint: Any, key: str, where: str, base: Any = None) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping (a section), got {value!r}")
        return _build(hint, value, key, where, base if isinstance(base, hint) else None)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key, where, base)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: '{key}' has no usable type")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads "1e-6" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: '{key}' must be {hint.__name__}, got {value!r}")
    return value


def _default(f: dataclasses.Field, base: Any) -> Any:
    if base is not None:
        return getattr(base, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls, data: dict, prefix: str, where: str, base: Any = None):
    """An instance of `cls` from `data`; fields not in `data` keep `base`'s values (else the class
    defaults)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else f"; known: {sorted(fields)}"
            raise ConfigError(f"{where}: unknown key '{_join(prefix, name)}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(prefix, name), where, _default(f, base))
        elif base is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{_join(prefix, name)}'")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {prefix or 'config'}: {e}") from None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def apply_override(data: dict, override: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into nested dicts."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected key=value, e.g. optim.lr=1e-6")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Instance of dataclass `cls` from a YAML file (or defaults) plus `key=value` overrides."""
    data: dict = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded or {}
    for override in overrides:
        apply_override(data, override)
    if overrides:
        where += " + overrides"
    return _build(cls, data, "", where)


def config_to_dict(cfg) -> dict:
    """Plain dict (for saving beside checkpoints and logs)."""
    return dataclasses.asdict(cfg)
