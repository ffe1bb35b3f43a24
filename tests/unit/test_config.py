"""Config presets, overrides, validation and the dict / YAML round trips."""

from __future__ import annotations

import dataclasses

import pytest

from mmdls_dist.config import (
    DEFAULT_PRESET,
    PRESETS_DIR,
    Config,
    DataConfig,
    dump_yaml,
    from_dict,
    load_config,
    resumable_fields,
    to_dict,
)
from mmdls_dist.options import field_docs, parse_override


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_shipped_preset_loads_and_round_trips(preset, tmp_path):
    cfg = load_config(preset)
    assert from_dict(Config, to_dict(cfg)) == cfg
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(str(path)) == cfg


def test_presets_say_what_they_are():
    debug, paper = load_config("debug"), load_config("paper")
    assert not debug.run.use_gpu and debug.run.num_workers == 2
    assert paper.run.use_gpu and paper.data.image_size == 224 and paper.data.max_slices == 30
    assert paper.optim.precision == "bf16"
    assert {"debug", "default", "paper"} <= {p.stem for p in PRESETS_DIR.glob("*.yaml")}


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("optim.lr=3e-4", ["optim", "lr"], 3e-4),
        ("run.use_gpu=true", ["run", "use_gpu"], True),
        ("model.widths=[4, 8, 8, 16]", ["model", "widths"], [4, 8, 8, 16]),
        ("data.steps_per_epoch=null", ["data", "steps_per_epoch"], None),
        ("run.name=my-run", ["run", "name"], "my-run"),
        ("data.shards=s3://bucket/x=1", ["data", "shards"], "s3://bucket/x=1"),
        # YAML 1.2 booleans only: YAML 1.1 would read off / no / on / yes as booleans.
        ("run.compile=off", ["run", "compile"], "off"),
        ("run.name=no", ["run", "name"], "no"),
        ("run.use_gpu=False", ["run", "use_gpu"], False),
    ],
)
def test_override_parsing(text, keys, value):
    assert parse_override(text) == (keys, value)


def test_compile_off_is_a_mode_not_a_boolean():
    assert load_config("paper", ["run.compile=off"]).run.compile == "off"


def test_overrides_apply_with_types():
    cfg = load_config(
        "debug",
        [
            "optim.lr=0.01",
            "model.widths=[4,8,8,16]",
            "optim.epochs=7",
            "prep.external_centers=[HOSP-B]",
        ],
    )
    assert cfg.optim.lr == 0.01 and cfg.model.widths == (4, 8, 8, 16) and cfg.optim.epochs == 7
    assert cfg.prep.external_centers == ("HOSP-B",)
    assert load_config("debug").optim.lr == 0.003  # presets are not mutated


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key(s): optim.lrr"),
        ("nosection.x=1", "unknown config key(s): nosection"),
        ("optim.lr=abc", "optim.lr: expected float, got str"),
        ("optim.epochs=1.5", "optim.epochs: expected int, got float"),
        ("run.use_gpu=3", "run.use_gpu: expected bool, got int"),
        ("optim.epochs=0", "optim.epochs and optim.grad_accum must be >= 1"),
        ("model.patient_fusion=voxels", "model.patient_fusion must be one of"),
        ("model.lesion_reader=4", "model.lesion_reader must be 0 (off) or >= 8"),
        ("optim", "not of the form section.key=value"),
        ("optim.early_stopping_patience=3", "needs run.metric to be a validation metric"),
    ],
)
def test_bad_overrides_fail_loudly(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("debug", [override])


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="neither a preset .*debug.*paper"):
        load_config("nope")


def test_data_config_validation():
    with pytest.raises(ValueError, match="data.batch_size must be >= 1"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="data.verify must be one of"):
        DataConfig(verify="maybe")


def test_with_values_sets_dotted_fields_and_revalidates():
    from mmdls_dist.config import with_values

    cfg = load_config("debug")
    out = with_values(cfg, {"optim.lr": 1e-4, "model.widths": (4, 8, 8, 16)})
    assert out.optim.lr == 1e-4 and out.model.widths == (4, 8, 8, 16)
    assert out.data == cfg.data
    with pytest.raises(ValueError, match="optim.lrr"):
        with_values(cfg, {"optim.lrr": 1.0})
    with pytest.raises(ValueError, match="optimizer"):
        with_values(cfg, {"optimizer.lr": 1.0})
    with pytest.raises(TypeError, match="optim.epochs"):
        with_values(cfg, {"optim.epochs": "many"})


@pytest.mark.parametrize("block", [f.name for f in dataclasses.fields(Config)])
def test_every_field_has_a_doc_comment(block):
    """The comment after a field is its --help text: none may be missing or empty."""
    cls = type(getattr(Config(), block))
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{block}: fields without a doc comment: {missing}"


def test_field_docs_read_continuation_lines():
    docs = field_docs(type(Config().model))
    assert docs["given_lesion_mask"].startswith("the lesion views read the lesion contour")
    assert docs["given_lesion_mask"].endswith("blends in during the warm-up")
    assert docs["widths"] == "ResNet encoder channels per stage (4 stages)"


def test_resumable_fields_come_from_field_metadata():
    free = resumable_fields()
    assert {"run", "chaos", "eval", "optim.epochs", "data.num_workers"} <= set(free)
    assert not {"model", "loss", "optim.lr", "data.batch_size", "data.max_slices"} & set(free)


def test_load_config_defaults_to_the_cli_preset():
    assert load_config() == load_config(DEFAULT_PRESET) == load_config("debug")


def test_the_last_epoch_is_deployed_unless_a_validation_metric_is_named():
    assert load_config("debug").run.metric == "epoch"
    cfg = load_config("debug", ["run.metric=val/cindex_os", "optim.early_stopping_patience=3"])
    assert cfg.optim.early_stopping_patience == 3
