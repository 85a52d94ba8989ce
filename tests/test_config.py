"""The config package: `_base_` files, per-model schemas, key and type checks, versions, the shipped YAMLs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unipan.config import (
    CONFIG_VERSION,
    MODEL_CONFIGS,
    Config,
    ConfigError,
    PanopticFPNConfig,
    UPSNetConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    read_config_file,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "unipan" / "configs"
BASES = CONFIGS / "base"
MODEL_FOLDERS = sorted(p for p in CONFIGS.iterdir() if p.is_dir() and p != BASES)

# configs/upsnet/tiny_synth.yaml as it was in the version-1 layout (one flat model section; the mask
# head inside roi_heads, UPSNet's inference settings inside model.upsnet, data.size_divisibility),
# i.e. what a version-1 checkpoint of the tiny UPSNet carries. Kept here, not read from git history.
V1_UPSNET_TINY = {
    "model": {
        "name": "upsnet",
        "backbone": {
            "name": "resnet18",
            "weights": "",
            "norm": "bn",
            "freeze_at": 0,
            "base_width": 32,
            "depths": [1, 1, 1, 1],
            "fpn_channels": 64,
        },
        "rpn": {
            "anchor_sizes": [8, 16, 32, 64, 128],
            "aspect_ratios": [0.5, 1.0, 2.0],
            "pre_nms_top_n_train": 300,
            "pre_nms_top_n_test": 300,
            "post_nms_top_n_train": 150,
            "post_nms_top_n_test": 150,
            "batch_size_per_image": 128,
        },
        "roi_heads": {
            "box_head_dim": 256,
            "batch_size_per_image": 64,
            "positive_fraction": 0.5,
            "pooler_sampling_ratio": 1,
            "detections_per_img": 50,
            "mask_head_convs": 2,
            "mask_head_channels": 64,
        },
        "upsnet": {
            "semantic_num_convs": 2,
            "semantic_mid_channels": 64,
            "semantic_out_channels": 32,
            "deformable": True,
            "global_context": True,
            "semantic_loss_weight": 0.5,
            "roi_loss_weight": 0.1,
            "panoptic_loss_weight": 0.25,
            "roi_loss_size": 28,
            "instance_keep_fraction": 0.7,
            "nms_thresh": 0.5,
            "score_thresh": 0.3,
            "max_detections": 50,
            "mask_overlap_thresh": 0.3,
            "stuff_area": 64,
        },
    },
    "data": {
        "dataset": "synthetic",
        "synth_size": [128, 128],
        "synth_options": {"min_instances": 3, "max_instances": 8},
        "min_size_train": [128],
        "max_size_train": 128,
        "min_size_test": 0,
        "max_size_test": 128,
        "flip_prob": 0.5,
        "size_divisibility": 32,
        "num_workers": 0,
    },
    "solver": {
        "batch_size": 8,
        "lr": 0.02,
        "max_iter": 650,
        "warmup_iters": 50,
        "warmup_factor": 0.001,
        "schedule": "step",
        "steps": [530, 615],
        "clip_grad_norm": 10.0,
    },
    "engine": {
        "output_dir": "runs/upsnet_tiny_synth",
        "device": "cpu",
        "log_period": 20,
        "checkpoint_period": 250,
        "eval_period": 0,
        "eval_max_images": 50,
        "num_threads": 2,
    },
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- _base_ ------------------------------------------------------------------------------------
def test_base_path_is_relative_to_the_file_naming_it(tmp_path, monkeypatch):
    write(tmp_path / "configs" / "base" / "sched.yaml", "solver:\n  lr: 0.5\n  max_iter: 10\n")
    child = write(tmp_path / "configs" / "m" / "x.yaml", "_base_: ../base/sched.yaml\nsolver:\n  max_iter: 20\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the folder of either file
    cfg = load_config(child)
    assert cfg.solver.lr == 0.5  # from the base
    assert cfg.solver.max_iter == 20  # the file wins over its base
    assert cfg.solver.batch_size == Config().solver.batch_size  # untouched keys keep the defaults


def test_base_of_a_base_is_relative_to_that_base(tmp_path):
    write(tmp_path / "b" / "deep" / "root.yaml", "engine:\n  seed: 7\n")
    write(tmp_path / "b" / "mid.yaml", "_base_: deep/root.yaml\nengine:\n  log_period: 3\n")
    cfg = load_config(write(tmp_path / "top.yaml", "_base_: b/mid.yaml\n"))
    assert (cfg.engine.seed, cfg.engine.log_period) == (7, 3)


def test_list_of_bases_merges_in_order_under_the_file(tmp_path):
    write(tmp_path / "one.yaml", "solver:\n  lr: 0.1\n  steps: [1, 2, 3]\n  max_iter: 100\nengine:\n  seed: 1\n")
    write(tmp_path / "two.yaml", "solver:\n  lr: 0.2\n  steps: [5]\ndata:\n  num_workers: 1\n")
    top = write(tmp_path / "top.yaml", "_base_: [one.yaml, two.yaml]\nengine:\n  seed: 3\n")
    cfg = load_config(top)
    assert cfg.solver.lr == 0.2  # the later base wins
    assert cfg.solver.steps == [5]  # lists are replaced, not merged
    assert cfg.solver.max_iter == 100  # mappings merge key by key
    assert cfg.data.num_workers == 1
    assert cfg.engine.seed == 3  # the file wins over every base
    assert "_base_" not in read_config_file(top)


def test_overrides_win_over_the_file_and_its_bases(tmp_path):
    write(tmp_path / "base.yaml", "solver:\n  lr: 0.1\n")
    top = write(tmp_path / "top.yaml", "_base_: base.yaml\nsolver:\n  max_iter: 5\n")
    cfg = load_config(top, ["solver.lr=0.3", "solver.max_iter=6"])
    assert (cfg.solver.lr, cfg.solver.max_iter) == (0.3, 6)


def test_base_cycle_is_an_error_naming_the_files(tmp_path):
    a = write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        load_config(a)
    assert "a.yaml" in str(info.value) and "b.yaml" in str(info.value)


def test_file_that_is_its_own_base_is_a_cycle(tmp_path):
    me = write(tmp_path / "me.yaml", "_base_: me.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(me)


def test_same_base_twice_in_a_diamond_is_no_cycle(tmp_path):
    write(tmp_path / "root.yaml", "engine:\n  seed: 9\n")
    write(tmp_path / "left.yaml", "_base_: root.yaml\n")
    write(tmp_path / "right.yaml", "_base_: root.yaml\n")
    assert load_config(write(tmp_path / "top.yaml", "_base_: [left.yaml, right.yaml]\n")).engine.seed == 9


def test_missing_base_is_an_error_naming_it_and_the_file_naming_it(tmp_path):
    top = write(tmp_path / "sub" / "top.yaml", "_base_: ../nowhere/absent.yaml\n")
    with pytest.raises(ConfigError, match="no such file") as info:
        load_config(top)
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "absent.yaml") in message
    assert "top.yaml" in message


def test_missing_config_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="absent.yaml"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("bases", ["3", "{a: b.yaml}", "[b.yaml, 4]"])
def test_base_must_be_a_path_or_a_list_of_paths(tmp_path, bases):
    write(tmp_path / "b.yaml", "")
    with pytest.raises(ConfigError, match="_base_"):
        load_config(write(tmp_path / "top.yaml", f"_base_: {bases}\n"))


# --- keys of another model, unknown keys, types ------------------------------------------------
def test_semantic_fpn_key_with_upsnet_names_the_key_and_the_model():
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "upsnet" / "tiny_synth.yaml", ["model.semantic.conv_dims=256"])
    message = str(info.value)
    assert "model.semantic" in message and "'upsnet'" in message
    # and says whose key it is (every model with a semantic FPN head)
    assert "it is a setting of" in message and "panoptic_fpn" in message.split("it is a setting of")[1]


def test_upsnet_key_with_panoptic_fpn_names_the_key_and_the_model():
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "panoptic_fpn" / "tiny_synth.yaml", ["model.upsnet.deformable=false"])
    message = str(info.value)
    assert "model.upsnet" in message and "'panoptic_fpn'" in message
    assert "setting of upsnet" in message


def test_key_of_another_model_in_a_file_names_the_file(tmp_path):
    top = write(tmp_path / "top.yaml", "model:\n  name: upsnet\n  semantic:\n    conv_dims: 64\n")
    with pytest.raises(ConfigError, match=r"top\.yaml.*model\.semantic.*'upsnet'"):
        load_config(top)


def test_field_of_another_models_fusion_is_named():
    # both models have model.fusion, with different settings
    with pytest.raises(ConfigError, match=r"model\.fusion\.instance_score_thresh.*'upsnet'.*setting of.*panoptic_fpn"):
        load_config(CONFIGS / "upsnet" / "tiny_synth.yaml", ["model.fusion.instance_score_thresh=0.3"])


def test_model_name_override_picks_the_schema():
    cfg = load_config(None, ["model.name=upsnet", "model.upsnet.deformable=false"])
    assert isinstance(cfg.model, UPSNetConfig) and cfg.model.upsnet.deformable is False
    assert isinstance(load_config().model, PanopticFPNConfig)


def test_unregistered_model_name_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="'nope'.*panoptic_fpn.*upsnet"):
        load_config(None, ["model.name=nope"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("nonsense=1", "nonsense"),
        ("nonsense.x=1", "nonsense"),
        ("solver.lrr=0.1", "solver.lrr"),
        ("data.size_divisibility=32", "data.size_divisibility"),  # gone in version 2
        ("engine.output=x", "engine.output"),
        ("model.backbone.depth=3", "model.backbone.depth"),
        ("model.roi_heads.mask_head_convs=2", "model.roi_heads.mask_head_convs"),  # a version-1 name
        ("model.mask_head.convs=2", "model.mask_head.convs"),
        ("model.nothing=1", "model.nothing"),
    ],
)
def test_unknown_key_anywhere_is_an_error_naming_it(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "panoptic_fpn" / "tiny_synth.yaml", [override])
    assert re.search(rf"\b{re.escape(key)}\b", str(info.value)), str(info.value)


def test_unknown_key_in_a_file_names_the_file_and_the_key(tmp_path):
    top = write(tmp_path / "top.yaml", "solver:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"top\.yaml.*solver\.learning_rate"):
        load_config(top)


def test_unknown_key_in_a_base_is_an_error(tmp_path):
    write(tmp_path / "base.yaml", "engine:\n  outdir: x\n")
    with pytest.raises(ConfigError, match=r"engine\.outdir"):
        load_config(write(tmp_path / "top.yaml", "_base_: base.yaml\n"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("solver.lr=fast", "solver.lr"),
        ("solver.max_iter=many", "solver.max_iter"),
        ("model.upsnet.deformable=maybe", "model.upsnet.deformable"),
        ("solver.steps=3", "solver.steps"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIGS / "upsnet" / "tiny_synth.yaml", [override])


def test_wrong_type_in_a_file_names_the_file_and_the_key(tmp_path):
    top = write(tmp_path / "top.yaml", "solver:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"top\.yaml.*solver\.lr"):
        load_config(top)


@pytest.mark.parametrize("override", ["solver.lr", "=3"])
def test_malformed_override_is_an_error_naming_it(override):
    with pytest.raises(ConfigError, match=re.escape(repr(override))):
        load_config(None, [override])


def test_wrong_type_in_a_file_names_its_line(tmp_path):
    top = write(tmp_path / "top.yaml", "solver:\n  max_iter: 3\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"top\.yaml line 3: solver\.lr: Value 'fast'"):
        load_config(top)


def test_unknown_key_in_a_file_names_its_line(tmp_path):
    top = write(tmp_path / "top.yaml", "engine:\n  device: cpu\nsolver:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"top\.yaml line 4: unknown config key solver\.learning_rate"):
        load_config(top)


def test_each_override_is_named_on_its_own():
    with pytest.raises(ConfigError, match=r"^override solver\.lr=fast: solver\.lr"):
        load_config(None, ["solver.max_iter=3", "solver.lr=fast", "engine.seed=1"])


# --- value ranges ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.roi_heads.positive_fraction=1.5", "model.roi_heads.positive_fraction must lie in (0, 1], got 1.5"),
        ("model.roi_heads.positive_fraction=0", "model.roi_heads.positive_fraction must lie in (0, 1], got 0"),
        ("model.rpn.positive_fraction=-0.1", "model.rpn.positive_fraction must lie in (0, 1]"),
        ("solver.clip_grad_norm=-1", "solver.clip_grad_norm must be >= 0, got -1.0"),
        ("engine.num_threads=-4", "engine.num_threads must be >= 0, got -4"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("solver.batch_size=0", "solver.batch_size must be > 0"),
        ("solver.max_iter=0", "solver.max_iter must be > 0"),
        ("solver.momentum=1.0", "solver.momentum must lie in [0, 1)"),
        ("data.flip_prob=2", "data.flip_prob must lie in [0, 1]"),
        ("data.pixel_std=[58.0,0.0,57.0]", "data.pixel_std must be > 0"),
        ("data.min_size_train=[640,-1]", "data.min_size_train must be >= 0, got [640, -1]"),
        ("model.backbone.freeze_at=6", "model.backbone.freeze_at must lie in [0, 5]"),
        ("model.rpn.anchor_sizes=[8,0,32,64,128]", "model.rpn.anchor_sizes must be > 0"),
        ("model.fusion.instance_score_thresh=1.2", "model.fusion.instance_score_thresh must lie in [0, 1]"),
        ("model.fusion.stuff_area=-1", "model.fusion.stuff_area must be >= 0"),
        ("model.rpn.bg_iou_thresh=0.8", "model.rpn.bg_iou_thresh must be <= fg_iou_thresh (0.7), got 0.8"),
        ("solver.lr=nan", "solver.lr must be >= 0, got nan"),
        ("engine.device=tpu", "engine.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ("data.synth_options={foo: 1}", "data.synth_options unknown option(s) foo (SynthOptions has:"),
        ("data.synth_options={occlusion: 1.5}", "data.synth_options occlusion must lie in [0, 1], got 1.5"),
        ("data.synth_size=[16,16]", "data.synth_size must be >= 32"),
    ],
)
def test_out_of_range_values_are_errors_naming_the_override_and_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "panoptic_fpn" / "tiny_synth.yaml", [override])
    assert str(info.value).startswith(f"override {override}: {message}"), str(info.value)


@pytest.mark.parametrize(
    ("model", "override"),
    [
        ("upsnet", "model.upsnet.instance_keep_fraction=1.1"),
        ("upsnet", "model.fusion.max_detections=0"),
        ("spatialflow", "model.spatialflow.prior_prob=1"),
        ("spinet", "model.spinet.bootstrap_ratio=0"),
        ("aunet", "model.aunet.mam_score_thresh=2"),
        ("refine", "model.refine.stage_loss_weights=[1,-1]"),
        ("refine", "model.fusion.rho=1.5"),
    ],
)
def test_every_models_own_settings_have_ranges(model, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^override {re.escape(override)}: {re.escape(key)} must"):
        load_config(CONFIGS / model / "tiny_synth.yaml", [override])


def test_values_at_the_edges_of_their_ranges_are_accepted():
    cfg = load_config(
        CONFIGS / "panoptic_fpn" / "tiny_synth.yaml",
        [
            "model.roi_heads.positive_fraction=1",
            "solver.clip_grad_norm=0",  # 0 = off
            "engine.num_threads=0",  # 0 = torch's default
            "solver.weight_decay_bias=null",  # null = solver.weight_decay
            "data.min_size_test=0",
            "engine.device=cuda:1",
        ],
    )
    assert cfg.model.roi_heads.positive_fraction == 1.0 and cfg.solver.weight_decay_bias is None


def test_a_value_out_of_range_in_a_file_names_the_file_and_line(tmp_path):
    write(tmp_path / "base.yaml", "solver:\n  lr: 0.1\n  clip_grad_norm: -1\n")
    top = write(tmp_path / "top.yaml", "_base_: base.yaml\nsolver:\n  max_iter: -3\n")
    with pytest.raises(ConfigError, match=r"top\.yaml line 3: solver\.max_iter must be > 0, got -3"):
        load_config(top)
    fixed = write(tmp_path / "fixed.yaml", "_base_: base.yaml\nsolver:\n  max_iter: 3\n")
    with pytest.raises(ConfigError, match=r"fixed\.yaml \(its base .*base\.yaml\) line 3: solver\.clip_grad_norm"):
        load_config(fixed)


def test_a_stored_config_is_checked_too():
    d = config_to_dict(Config())
    d["model"]["roi_heads"]["positive_fraction"] = 1.5
    with pytest.raises(ConfigError, match=r"^stored config: model\.roi_heads\.positive_fraction must lie in"):
        config_from_dict(d)


def test_every_numeric_setting_has_a_range():
    """A new number in a schema gets a range in unipan/config/ranges.py, or a reason here not to."""
    import dataclasses

    from unipan.config.ranges import RANGES

    no_obvious_range = {("Config", "config_version"), ("DataConfig", "synth_seed"), ("EngineConfig", "seed")}

    def numeric(value):
        items = value if isinstance(value, list) else [value]
        return value is None or any(isinstance(v, int | float) and not isinstance(v, bool) for v in items)

    def walk(node):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value)
            elif numeric(value) or f.type in ("int", "float", "list[int]", "list[float]", "float | None"):
                yield type(node), f.name

    missing = set()
    for cls in MODEL_CONFIGS.values():
        for owner, name in walk(Config(model=cls())):
            ranged = any(name in RANGES.get(base, {}) for base in owner.__mro__)
            if not ranged and (owner.__name__, name) not in no_obvious_range:
                missing.add(f"{owner.__name__}.{name}")
    assert not missing, sorted(missing)


# --- invalid YAML ------------------------------------------------------------------------------
def test_invalid_yaml_names_the_file_line_and_column(tmp_path):
    bad = write(tmp_path / "bad.yaml", "solver:\n  lr: 0.1\n\tmax_iter: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    message = str(info.value)
    assert "bad.yaml" in message and "invalid YAML" in message
    assert "line 3 column 1" in message


def test_invalid_yaml_in_a_base_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", "solver: [1, 2\nengine: 3\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: invalid YAML at line 2 column \d+"):
        load_config(write(tmp_path / "top.yaml", "_base_: base.yaml\n"))


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- a\n- b\n"))


def test_empty_file_gives_the_defaults(tmp_path):
    assert config_to_dict(load_config(write(tmp_path / "empty.yaml", ""))) == config_to_dict(Config())


# --- versions ----------------------------------------------------------------------------------
def test_v1_flat_dict_migrates():
    cfg = config_from_dict(V1_UPSNET_TINY)
    assert isinstance(cfg.model, UPSNetConfig)
    assert cfg.config_version == CONFIG_VERSION
    # the mask head left roi_heads; the shared RoIAlign sampling ratio went to both heads
    assert (cfg.model.mask_head.num_convs, cfg.model.mask_head.conv_dims) == (2, 64)
    assert cfg.model.mask_head.sampling_ratio == cfg.model.roi_heads.sampling_ratio == 1
    assert (cfg.model.roi_heads.pooler_resolution, cfg.model.mask_head.pooler_resolution) == (7, 14)
    # UPSNet's inference settings left model.upsnet for model.fusion
    fusion = cfg.model.fusion
    assert (fusion.score_thresh, fusion.max_detections, fusion.stuff_area) == (0.3, 50, 64)
    assert cfg.model.upsnet.semantic_out_channels == 32
    # what version 1 gives is what today's file gives
    assert config_to_dict(cfg) == config_to_dict(load_config(CONFIGS / "upsnet" / "tiny_synth.yaml"))


def test_v1_instance_class_assignment_becomes_fusion_class_assignment():
    v1 = {"model": {"name": "upsnet", "upsnet": {"instance_class_assignment": False, "unknown": False}}}
    cfg = config_from_dict(v1)
    assert cfg.model.fusion.class_assignment is False and cfg.model.fusion.unknown is False


def test_v1_dict_drops_the_other_models_sections():
    # version-1 checkpoints stored every model's section whatever model.name was
    v1 = {
        "model": {
            "name": "panoptic_fpn",
            "semantic": {"conv_dims": 32},
            "fusion": {"stuff_area": 10},
            "upsnet": {"score_thresh": 0.1},
        }
    }
    cfg = config_from_dict(v1)
    assert (cfg.model.semantic.conv_dims, cfg.model.fusion.stuff_area) == (32, 10)
    v1["model"]["name"] = "upsnet"
    assert config_from_dict(v1).model.fusion.score_thresh == 0.1


def test_config_version_is_saved_and_read_back(tmp_path):
    cfg = load_config(CONFIGS / "upsnet" / "tiny_synth.yaml", ["solver.lr=0.005"])
    d = config_to_dict(cfg)
    assert d["config_version"] == CONFIG_VERSION
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert saved["config_version"] == CONFIG_VERSION
    back = config_from_dict(saved)
    assert back.config_version == CONFIG_VERSION
    assert config_to_dict(back) == d
    assert config_to_dict(load_config(path)) == d  # a saved config is a config file too
    assert config_to_dict(config_from_dict(d, ["solver.lr=0.1"]))["solver"]["lr"] == 0.1


@pytest.mark.parametrize("version", [0, CONFIG_VERSION + 1, 99])
def test_unknown_config_version_is_an_error(version):
    d = config_to_dict(Config())
    d["config_version"] = version
    with pytest.raises(ConfigError, match=rf"version {version}\b"):
        config_from_dict(d)


# --- the shipped configs -----------------------------------------------------------------------
@pytest.mark.parametrize("folder", MODEL_FOLDERS, ids=lambda p: p.name)
def test_every_config_of_a_model_folder_loads(folder):
    assert folder.name in MODEL_CONFIGS, f"configs/{folder.name}/ is not a registered model's folder"
    files = sorted(folder.glob("*.yaml"))
    assert files, f"configs/{folder.name}/ has no config"
    for path in files:
        cfg = load_config(path)
        assert isinstance(cfg.model, MODEL_CONFIGS[folder.name]), path
        assert cfg.model.name == folder.name, path
        assert cfg.engine.output_dir != Config().engine.output_dir, f"{path}: set engine.output_dir"
        assert config_to_dict(config_from_dict(config_to_dict(cfg))) == config_to_dict(cfg), path


def test_model_folders_are_found():
    assert {p.name for p in MODEL_FOLDERS} >= {"panoptic_fpn", "upsnet"}


@pytest.mark.parametrize("path", sorted(BASES.glob("*.yaml")), ids=lambda p: p.name)
def test_bases_compose(path):
    """A base names no model and no output folder: the configs that inherit it choose those."""
    data = read_config_file(path)
    assert "name" not in data.get("model", {}), f"{path.name}: model.name belongs in the model's config"
    assert "output_dir" not in data.get("engine", {}), f"{path.name}: engine.output_dir belongs in the config"


def test_bases_of_rpn_models_stay_apart_from_the_backbone():
    """Models without RPN and RoI heads (SpatialFlow, SPINet) inherit the backbone and data bases."""
    for name in ("r50_fpn.yaml", "tiny_synth.yaml", "coco_panoptic.yaml", "cityscapes_panoptic.yaml"):
        model = read_config_file(BASES / name).get("model", {})
        assert set(model) <= {"backbone"}, f"{name}: {sorted(model)}"


def test_configs_name_no_machine_path():
    absolute = re.compile(r"(?:^|[\s\"'(\[])/[A-Za-z]")
    for path in sorted(CONFIGS.rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        assert not absolute.search(text), f"{path}: absolute path"
        assert "NOTES.md" not in text, f"{path}: a document outside the repository"


# --- package boundaries ------------------------------------------------------------------------
def test_config_package_imports_no_torch():
    code = (
        "import sys\n"
        "from unipan.config import load_config\n"
        f"load_config({str(CONFIGS / 'upsnet' / 'tiny_synth.yaml')!r})\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_model_configs_match_the_model_registry():
    from unipan.modeling.registry import MODELS

    assert set(MODEL_CONFIGS) == set(MODELS)


def test_the_configs_ship_inside_the_package():
    """`unipan demo` and `unipan train <model>/<name>` need them after a non-editable install."""
    import tomllib

    import unipan
    from unipan.config import config_dir

    assert config_dir() == Path(unipan.__file__).resolve().parent / "configs" == CONFIGS
    with open(REPO / "pyproject.toml", "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["unipan"]
    packaged = {p for pattern in patterns for p in (REPO / "unipan").glob(pattern)}
    assert packaged == set(CONFIGS.rglob("*.yaml")) and len(packaged) > 20
