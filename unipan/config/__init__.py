"""One config system: typed dataclasses, YAML files that inherit with `_base_`, dotted overrides.

`load_config(path, overrides)` resolves the file's `_base_` chain, reads `model.name` (overrides
first, then the file), picks that model's schema from `MODEL_CONFIGS` and merges the file and the
overrides over its defaults. Names and types are checked: a key that belongs to another model, or
to none, is an error naming the key and the model. `save_config` writes the resolved config, with
its `config_version`, beside a run's checkpoints; `config_from_dict` also reads the flat configs
that version-1 checkpoints carry.

This package imports no torch: the light CLI verbs read configs too.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from unipan.config.models import MODEL_CONFIGS, ModelConfig, PanopticFPNConfig, UPSNetConfig, UPSNetHeadsConfig
from unipan.config.parts import (
    BackboneConfig,
    DataConfig,
    EngineConfig,
    MaskHeadConfig,
    RoIHeadsConfig,
    RPNConfig,
    SemanticFPNHeadConfig,
    SolverConfig,
)
from unipan.files import atomic_write_text
from unipan.fusion.settings import HeuristicFusionSettings, PanopticHeadSettings

__all__ = [
    "CONFIG_VERSION",
    "MODEL_CONFIGS",
    "BackboneConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "HeuristicFusionSettings",
    "MaskHeadConfig",
    "ModelConfig",
    "PanopticFPNConfig",
    "PanopticHeadSettings",
    "RPNConfig",
    "RoIHeadsConfig",
    "SemanticFPNHeadConfig",
    "SolverConfig",
    "UPSNetConfig",
    "UPSNetHeadsConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "read_config_file",
    "save_config",
]

CONFIG_VERSION = 2
"""Version of the saved config layout. 1: one flat `model` section holding every model's fields."""

DEFAULT_MODEL = "panoptic_fpn"

BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


@dataclass
class Config:
    """The whole resolved config of a run."""

    # one model's schema, chosen by model.name (unipan.config.models.MODEL_CONFIGS)
    model: Any = field(default_factory=PanopticFPNConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # layout version of this config (written into every saved config and checkpoint)
    config_version: int = CONFIG_VERSION


# --- YAML files with _base_ --------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read ({e.strerror or e})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config {path}: invalid YAML{where}: {problem}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`: mappings merge key by key, everything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_config_file(path: str | os.PathLike[str], _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The plain dict of a YAML config with its `_base_` files merged under it.

    `_base_` is a path (or a list of paths, merged in order) relative to the file naming it.

    Raises:
        ConfigError: naming the file for unreadable files, invalid YAML, a missing base or a cycle.
    """
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"config {path}: _base_ files form a cycle ({cycle})")
    if not path.is_file():
        named_by = f" (the _base_ of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config {path}: no such file{named_by}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config {path}: _base_ must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _deep_merge(merged, read_config_file(path.parent / base, (*_chain, path)))
    return _deep_merge(merged, data)


# --- key checks --------------------------------------------------------------------------------
def _field_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _has_key(schema: Any, parts: list[str]) -> bool:
    node = schema
    for part in parts:
        if not dataclasses.is_dataclass(node) or part not in _field_names(node):
            return False
        node = getattr(node, part)
    return True


def _check_keys(values: dict[str, Any], schema: Any, prefix: str, where: str, model_name: str) -> None:
    """Raise ConfigError for the first key of `values` that `schema` (a dataclass) lacks."""
    names = _field_names(schema)
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            if path.startswith("model."):
                parts = path.split(".")[1:]
                owners = sorted(n for n, cls in MODEL_CONFIGS.items() if n != model_name and _has_key(cls(), parts))
                owned = f"; it is a setting of {', '.join(owners)}" if owners else ""
                raise ConfigError(
                    f"{where}: {path} is not a setting of model {model_name!r}{owned} "
                    f"({prefix.rstrip('.')} has: {', '.join(names)})"
                )
            parent = prefix.rstrip(".") or "the top level"
            raise ConfigError(f"{where}: unknown config key {path} ({parent} has: {', '.join(names)})")
        child = getattr(schema, key)
        if dataclasses.is_dataclass(child) and isinstance(value, dict):
            _check_keys(value, child, f"{path}.", where, model_name)


def _model_name(layers: list[tuple[str, dict[str, Any]]]) -> str:
    name, named_by = DEFAULT_MODEL, "the default"
    for where, values in layers:
        model = values.get("model")
        if isinstance(model, dict) and "name" in model:
            name, named_by = model["name"], where
    if name not in MODEL_CONFIGS:
        known = ", ".join(sorted(MODEL_CONFIGS))
        raise ConfigError(f"{named_by}: model.name {name!r} is not a registered model; registered: {known}")
    return str(name)


def _merge_layers(layers: list[tuple[str, dict[str, Any]]]) -> Config:
    """Merge plain-dict layers (where, values) over the defaults of the named model's schema."""
    name = _model_name(layers)
    defaults = Config(model=MODEL_CONFIGS[name]())
    cfg = OmegaConf.structured(defaults)
    for where, values in layers:
        values = {k: v for k, v in values.items() if k != "config_version"}
        _check_keys(values, defaults, "", where, name)
        try:
            cfg = OmegaConf.merge(cfg, values)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            message = str(e).splitlines()[0]
            raise ConfigError(f"{where}: {key}: {message}" if key else f"{where}: {message}") from e
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from e
        assert isinstance(parsed, dict)
        out = _deep_merge(out, {str(k): v for k, v in parsed.items()})
    return out


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults of the named model <- YAML file (with its `_base_` chain) <- dotted overrides.

    Raises:
        ConfigError (a ValueError): naming the file or override and the key that is unknown, belongs
            to another model, or has a wrong type.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        where = f"config {path}"
        values = read_config_file(path)
        # files carry no version (they are written for this schema), except saved old runs' configs
        if _version(values, where, default=CONFIG_VERSION) == 1:
            values = _migrate_v1(values, where)
        layers.append((where, values))
    if overrides:
        layers.append(("overrides", _parse_overrides(list(overrides))))
    return _merge_layers(layers)


# --- saved configs -----------------------------------------------------------------------------
def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (what checkpoints store)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def _version(d: dict[str, Any], where: str, default: int) -> int:
    value = d.get("config_version", default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: config_version must be an integer, got {value!r}")
    if not 1 <= value <= CONFIG_VERSION:
        raise ConfigError(f"{where}: config_version {value}; this unipan reads versions 1..{CONFIG_VERSION}")
    return value


def _migrate_v1(d: dict[str, Any], where: str) -> dict[str, Any]:
    """A version-1 config (one flat model section with every model's fields) in the version-2 layout."""
    d = copy.deepcopy(d)
    d.pop("config_version", None)
    model = d.get("model", {})
    if "mask_head" in model:
        # version 1 never had this section: a current-layout dict that lost its config_version
        raise ConfigError(f"{where}: has no config_version but a model.mask_head section; set config_version: 2")
    name = model.get("name", DEFAULT_MODEL)
    roi = dict(model.get("roi_heads", {}))
    mask_head = {}
    for old, new in (
        ("mask_pooler_resolution", "pooler_resolution"),
        ("mask_head_convs", "num_convs"),
        ("mask_head_channels", "conv_dims"),
    ):
        if old in roi:
            mask_head[new] = roi.pop(old)
    if "pooler_sampling_ratio" in roi:
        roi["sampling_ratio"] = mask_head["sampling_ratio"] = roi.pop("pooler_sampling_ratio")
    if "box_pooler_resolution" in roi:
        roi["pooler_resolution"] = roi.pop("box_pooler_resolution")
    new_model: dict[str, Any] = {"name": name, "roi_heads": roi, "mask_head": mask_head}
    for part in ("backbone", "rpn"):
        if part in model:
            new_model[part] = model[part]
    if name == "upsnet":
        ups = dict(model.get("upsnet", {}))
        fusion_keys = {f.name for f in dataclasses.fields(PanopticHeadSettings)}
        fusion = {k: ups.pop(k) for k in list(ups) if k in fusion_keys}
        if "instance_class_assignment" in ups:
            fusion["class_assignment"] = ups.pop("instance_class_assignment")
        new_model["upsnet"] = ups
        new_model["fusion"] = fusion
    else:
        for part in ("semantic", "fusion"):
            if part in model:
                new_model[part] = model[part]
    d["model"] = new_model
    d.get("data", {}).pop("size_divisibility", None)
    return d


def config_from_dict(d: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """A Config from `config_to_dict`'s output (any version), with optional dotted overrides.

    Raises:
        ConfigError: for keys or types the schema rejects, or an unknown version.
    """
    if _version(d, "stored config", default=1) == 1:
        d = _migrate_v1(d, "stored config")
    layers: list[tuple[str, dict[str, Any]]] = [("stored config", d)]
    if overrides:
        layers.append(("overrides", _parse_overrides(list(overrides))))
    return _merge_layers(layers)


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), config_to_yaml(cfg))
