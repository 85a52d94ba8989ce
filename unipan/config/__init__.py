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
from unipan.config.ranges import check_values
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
    "config_dir",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "read_config_file",
    "resolve_config_path",
    "save_config",
]

CONFIG_VERSION = 2
"""Version of the saved config layout. 1: one flat `model` section holding every model's fields."""

DEFAULT_MODEL = "panoptic_fpn"

BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key.

    Attributes:
        key: the dotted key at fault, when one is (for the position of the key in its file).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class _Layer:
    """One source of values merged over the defaults: a file (with its bases) or one override."""

    where: str  # how the messages name it: "config x.yaml", "override solver.lr=fast"
    values: dict[str, Any]
    path: Path | None = None  # the YAML file, to find a key's line


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
                    f"({prefix.rstrip('.')} has: {', '.join(names)})",
                    key=path,
                )
            parent = prefix.rstrip(".") or "the top level"
            raise ConfigError(f"{where}: unknown config key {path} ({parent} has: {', '.join(names)})", key=path)
        child = getattr(schema, key)
        if dataclasses.is_dataclass(child) and isinstance(value, dict):
            _check_keys(value, child, f"{path}.", where, model_name)


def _model_name(layers: list[_Layer]) -> str:
    name, named_by = DEFAULT_MODEL, "the default"
    for layer in layers:
        model = layer.values.get("model")
        if isinstance(model, dict) and "name" in model:
            name, named_by = model["name"], layer.where
    if name not in MODEL_CONFIGS:
        known = ", ".join(sorted(MODEL_CONFIGS))
        raise ConfigError(f"{named_by}: model.name {name!r} is not a registered model; registered: {known}")
    return str(name)


def _sets(values: dict[str, Any], key: str) -> bool:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _key_line(path: Path, key: str, _seen: tuple[Path, ...] = ()) -> tuple[Path, int] | None:
    """(file, 1-based line) where `key` is written in `path` or, failing that, in its `_base_` files."""
    if path in _seen:
        return None
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(root, yaml.MappingNode):
        return None
    node: Any = root
    for part in key.split("."):
        value = None
        if isinstance(node, yaml.MappingNode):
            value = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        if value is None:
            node = None
            break
        line, node = value.start_mark.line + 1, value
    if node is not None:
        return path, line
    bases = next((v for k, v in root.value if getattr(k, "value", None) == BASE_KEY), None)
    names = (
        [bases.value]
        if isinstance(bases, yaml.ScalarNode)
        else [getattr(b, "value", "") for b in getattr(bases, "value", [])]
    )
    for base in reversed(names):  # the last base wins the merge
        found = _key_line((path.parent / str(base)).resolve(), key, (*_seen, path))
        if found is not None:
            return found
    return None


def _where(layer: _Layer, key: str | None) -> str:
    """How an error names the source of `key`: the override, or the file and line that set it."""
    if layer.path is None or key is None:
        return layer.where
    found = _key_line(layer.path, key)
    if found is None:
        return layer.where
    file, line = found
    shown = layer.where if file == layer.path else f"{layer.where} (its base {file})"
    return f"{shown} line {line}"


def _merge_layers(layers: list[_Layer]) -> Config:
    """Merge the layers over the defaults of the named model's schema, then check the values."""
    name = _model_name(layers)
    defaults = Config(model=MODEL_CONFIGS[name]())
    cfg = OmegaConf.structured(defaults)
    for layer in layers:
        values = {k: v for k, v in layer.values.items() if k != "config_version"}
        try:
            _check_keys(values, defaults, "", layer.where, name)
        except ConfigError as e:
            if layer.path is None or e.key is None:
                raise
            raise ConfigError(str(e).replace(layer.where, _where(layer, e.key), 1), key=e.key) from e
        try:
            cfg = OmegaConf.merge(cfg, values)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            message = str(e).splitlines()[0]
            where = _where(layer, key)
            raise ConfigError(f"{where}: {key}: {message}" if key else f"{where}: {message}", key=key) from e
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    problems = check_values(obj)
    if problems:
        key, problem = problems[0]
        setter = next((layer for layer in reversed(layers) if _sets(layer.values, key)), None)
        where = "the defaults" if setter is None else _where(setter, key)
        more = f" (and {len(problems) - 1} more: {', '.join(k for k, _ in problems[1:4])})" if len(problems) > 1 else ""
        raise ConfigError(f"{where}: {key} {problem}{more}", key=key)
    return obj


def _parse_override(item: str) -> dict[str, Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from e
    assert isinstance(parsed, dict)
    return {str(k): v for k, v in parsed.items()}


def _override_layers(overrides: list[str]) -> list[_Layer]:
    """One layer per override, so that an error names the override it comes from."""
    return [_Layer(f"override {item}", _parse_override(item)) for item in overrides]


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults of the named model <- YAML file (with its `_base_` chain) <- dotted overrides.

    Raises:
        ConfigError (a ValueError): naming the override, or the file and line, and the key that is
            unknown, belongs to another model, has a wrong type or a value out of its range
            (`unipan.config.ranges`).
    """
    layers: list[_Layer] = []
    if path is not None:
        where = f"config {path}"
        values = read_config_file(path)
        # files carry no version (they are written for this schema), except saved old runs' configs
        if _version(values, where, default=CONFIG_VERSION) == 1:
            values = _migrate_v1(values, where)
        layers.append(_Layer(where, values, Path(path).resolve()))
    layers += _override_layers(list(overrides or ()))
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
    return _merge_layers([_Layer("stored config", d), *_override_layers(list(overrides or ()))])


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), config_to_yaml(cfg))


# --- the shipped configs -----------------------------------------------------------------------
def config_dir() -> Path:
    """The configs shipped with unipan (`configs/<model>/*.yaml`, `configs/base/`)."""
    path = Path(__file__).resolve().parents[1] / "configs"
    if not path.is_dir():
        raise ConfigError(f"{path}: the shipped configs folder is missing (a broken installation)")
    return path


def resolve_config_path(name: str | os.PathLike[str]) -> Path:
    """A config file named on the command line: a path, or a shipped config's name.

    `panoptic_fpn/tiny_synth` (or with `.yaml`) names `config_dir()/panoptic_fpn/tiny_synth.yaml`,
    so a config can be used without knowing where unipan is installed. An existing path wins.

    Raises:
        ConfigError: neither a file nor a shipped config (lists the shipped model folders).
    """
    path = Path(name)
    if path.is_file():
        return path
    if path.exists():
        raise ConfigError(f"config {path}: is a folder, not a YAML file")
    if not path.is_absolute():
        root = config_dir()
        for candidate in (root / path, root / path.with_suffix(".yaml")):
            if candidate.is_file():
                return candidate
        if len(path.parts) > 1 and path.parts[0] == "configs":  # configs/<model>/x.yaml as in a source checkout
            return resolve_config_path(Path(*path.parts[1:]))
    shipped = ", ".join(sorted(p.name for p in config_dir().iterdir() if p.is_dir() and p.name != "base"))
    raise ConfigError(f"config {path}: no such file, nor a shipped config (<model>/<name>; models: {shipped})")
