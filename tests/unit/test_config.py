"""Training config: defaults, YAML, dotted overrides, and one-line errors for bad values."""

from __future__ import annotations

import pytest

from ctm_dist.train.config import ConfigError, TrainConfig, apply_override, build_config
from ctm_dist.train.engine import deepspeed_config
from ctm_dist.train.schedule import WarmupCosine


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "run: {name: exp1, seed: 3}\noptim: {lr: 0.01}\nmodel: {preset: demo, d_model: 96}\n"
        "deepspeed: {zero_stage: 3, offload_params: true}\n"
    )
    cfg = build_config(
        str(path),
        [
            "optim.lr=1e-3",
            "model.iterations=5",
            "scale.workers=4",
            "data.batch_size=32",
            "deepspeed.grad_accumulation=2",
        ],
    )
    assert cfg.run.name == "exp1" and cfg.run.seed == 3
    assert cfg.optim.lr == pytest.approx(
        1e-3
    )  # CLI beats YAML; "1e-3" (a YAML string) becomes a float
    assert cfg.model.overrides == {"d_model": 96, "iterations": 5}
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.offload_params is True
    assert cfg.micro_batch_size == 32 // (4 * 2)


def test_round_trip_through_dict():
    cfg = build_config(None, ["model.d_model=64", "optim.betas=[0.8,0.95]", "run.name=x"])
    again = TrainConfig.from_dict(cfg.to_dict()).validate()
    assert again == cfg
    assert again.optim.betas == (0.8, 0.95)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.batch_size=30", "not divisible by scale.workers*deepspeed.grad_accumulation=2*2=4"),
        ("deepspeed.zero_stage=4", "zero_stage must be 0, 1, 2 or 3, got 4"),
        ("deepspeed.precision=fp8", "precision must be one of bf16, fp16, fp32"),
        ("optim.lrr=1", "unknown config field 'optim.lrr'"),
        ("nosuch.field=1", "unknown config field 'nosuch'"),
        ("model.d_modl=1", "unknown config field 'model.d_modl'"),
        ("model.d_model=big", "model.d_model: expected an integer, got 'big'"),
        ("scale.workers=1.5", "scale.workers: expected an integer"),
        ("deepspeed.offload_params=true", "offload_params needs deepspeed.zero_stage=3"),
        ("data.task=imagenet", "data.url is required for task 'imagenet'"),
        ("model.heads=5", "d_input (64) must be divisible by heads (5)"),
        ("run.name=a/b", "run.name must be a non-empty name without '/'"),
        ("optim.lr", "is not of the form section.field=value"),
    ],
)
def test_bad_values_give_one_clear_line(override, fragment):
    overrides = (
        ["deepspeed.grad_accumulation=2", override] if "batch_size" in override else [override]
    )
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad YAML in .*bad.yaml \(line \d+, column \d+\)"):
        build_config(str(path))
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config(str(path))
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_config(str(tmp_path / "missing.yaml"))


def test_deepspeed_dict_states_every_knob():
    cfg = build_config(
        None,
        [
            "scale.workers=4",
            "data.batch_size=64",
            "deepspeed.grad_accumulation=2",
            "deepspeed.zero_stage=3",
            "deepspeed.offload_optimizer=true",
            "deepspeed.offload_params=true",
            "deepspeed.precision=bf16",
        ],
    )
    ds = deepspeed_config(cfg)
    assert (
        ds["train_batch_size"]
        == 64
        == ds["train_micro_batch_size_per_gpu"] * 4 * ds["gradient_accumulation_steps"]
    )
    assert (
        ds["gradient_clipping"] == 0.0
    )  # explicit: DeepSpeed >= 0.19.3 would clip at 1.0 otherwise
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_warmup_then_cosine():
    s = WarmupCosine(base_lr=1e-3, warmup=10, total=110, start_lr=0.0, min_lr=1e-5)
    assert s.lr(0) == 0.0
    assert s.lr(5) == pytest.approx(5e-4)
    assert s.lr(10) == pytest.approx(1e-3)
    assert s.lr(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert s.lr(110) == pytest.approx(1e-5) and s.lr(500) == pytest.approx(1e-5)
    lrs = [s.lr(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert WarmupCosine(1e-3, 0, 100, cosine=False).lr(99) == 1e-3


def test_a_whole_section_set_to_a_scalar_is_rejected():
    cfg = TrainConfig()
    with pytest.raises(ConfigError, match=r"override 'model=3': expected section\.field=value"):
        apply_override(cfg, "model=3")
    with pytest.raises(ConfigError, match="model: expected a mapping, got 3"):
        TrainConfig.from_dict({"model": 3})


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
        ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
        ("optim.betas=[0.9,inf]", "optim.betas must be a finite number, got inf"),
        ("deepspeed.gradient_clipping=inf", "deepspeed.gradient_clipping must be a finite number"),
        ("run.preemption_grace_s=inf", "run.preemption_grace_s must be a finite number"),
        ("model.dropout=inf", "model.dropout must be a finite number"),
        ("run.seed=1e30", "run.seed must be in [0, 2**32), got 1000000000000000019884624838656"),
        ("run.seed=-1", "run.seed must be in [0, 2**32), got -1"),
        ("run.seed=4294967296", "run.seed must be in [0, 2**32)"),
        (
            "run.max_steps=1e30",
            "run.max_steps=1000000000000000019884624838656 does not fit in a 64-bit integer",
        ),
        ("run.max_steps=inf", "run.max_steps: expected an integer, got 'inf'"),
        ("run.preemption_signals=SIGKILL", "SIGKILL cannot be caught"),
        ("run.preemption_signals=SIGTERM,SIGSTOP", "SIGSTOP cannot be caught"),
        ("scale.max_failures=-1", "scale.max_failures must be >= 0"),
        ("optim.eps=0", "optim.eps must be > 0"),
    ],
)
def test_values_that_would_fail_later_fail_in_the_config(override, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(None, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_key_given_twice_in_a_yaml_mapping_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("optim:\n  lr: 1.0e-2\n  weight_decay: 0.1\n  lr: 1.0e-3\n")
    with pytest.raises(
        ConfigError,
        match=r"bad YAML in .*twice\.yaml \(line 4, column 3\): duplicate key 'lr' "
        r"\(first given on line 2\)",
    ):
        build_config(str(path))
    path.write_text("run: {seed: 1}\noptim: {lr: 1.0e-3}\nrun: {seed: 2}\n")
    with pytest.raises(ConfigError, match="duplicate key 'run'"):
        build_config(str(path))
    path.write_text(
        "base: &b {lr: 1.0e-3}\noptim:\n  <<: *b\n  lr: 2.0e-3\n"
    )  # a merge key is no duplicate
    with pytest.raises(ConfigError, match="unknown config field 'base'"):
        build_config(str(path))


def test_validation_changes_nothing_and_always_checks_the_model():
    cfg = build_config(None, ["model.d_model=96"], validate=False)
    cfg.model.overrides["iterations"] = "5"  # set in code, not through the coercing layers
    before = cfg.to_dict()
    with pytest.raises(ConfigError, match=r"model\.iterations: expected int, got '5'"):
        cfg.validate()
    assert cfg.to_dict() == before
    cfg.model.overrides["iterations"] = 5
    assert cfg.validate().to_dict() == {
        **before,
        "model": {
            "kind": "ctm",
            "preset": "demo",
            "overrides": {"d_model": 96, "iterations": 5},
            "init_from": "",
        },
    }
    cfg.model.overrides["no_such_field"] = 1
    with pytest.raises(ConfigError, match=r"unknown config field 'model\.no_such_field'"):
        cfg.validate()


def test_preset_arguments_set_task_sizes():
    cfg = build_config(overrides=["model.preset=parity", "model.sequence_length=16"])
    assert cfg.model.overrides["sequence_length"] == 16
    cfg = build_config(overrides=["model.preset=mazes", "model.route_length=20"])
    assert cfg.model.overrides["route_length"] == 20
    with pytest.raises(ConfigError, match="sequence_length"):
        build_config(overrides=["model.preset=parity", "model.sequence_length=many"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("run.preemption_signals=SIGTERM,SIGNOPE", "run.preemption_signals"),
        ("run.preemption_grace_s=0", "run.preemption_grace_s"),
        ("run.storage_retry_deadline=-1", "run.storage_retry_deadline"),
    ],
)
def test_fault_tolerance_knobs_are_validated(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_config(overrides=[override])


def test_preemption_signals_parse_to_numbers():
    import signal

    from ctm_dist.train.preemption import parse_signals

    cfg = build_config(overrides=["run.preemption_signals=SIGUSR2, SIGTERM"])
    assert parse_signals(cfg.run.preemption_signals) == (signal.SIGUSR2, signal.SIGTERM)


def test_model_kind_picks_the_lstm_baseline_and_checks_its_fields():
    from ctm_dist.model import LSTMConfig, model_config

    cfg = build_config(
        overrides=[
            "data.task=parity",
            "model.kind=lstm",
            "model.preset=parity",
            "model.num_layers=2",
        ]
    )
    lstm = model_config(cfg.model.kind, cfg.model.preset, **cfg.model.overrides)
    assert isinstance(lstm, LSTMConfig) and (lstm.d_model, lstm.num_layers) == (669, 2)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.kind=gru"], "model.kind must be one of ctm, lstm, ff, got 'gru'"),
        (["model.kind=lstm", "model.preset=imagenet"], "no LSTM preset 'imagenet'"),
        (
            ["model.kind=lstm", "model.preset=parity", "model.memory_length=4"],
            "unknown LSTMConfig fields ['memory_length']",
        ),
        (["model.preset=parity", "model.num_layers=2"], "unknown CTMConfig fields ['num_layers']"),
    ],
)
def test_bad_model_kind_or_fields_are_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as error:
        build_config(overrides=["data.task=parity", *overrides])
    assert fragment in str(error.value) and "\n" not in str(error.value)
