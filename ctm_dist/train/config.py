"""Typed training config: dataclasses, YAML loading, dotted CLI overrides, validation.

A config is built in three layers, later ones winning: the dataclass defaults, an optional
YAML file, then dotted overrides such as ``model.d_model=256 optim.lr=1e-3``. Values are
converted to their fields' types while merging (``model.*`` ones to ``CTMConfig``'s); validation
only checks, changes nothing, and always runs. Every error (unknown field, wrong type, a key twice
in one YAML mapping, a number that is not finite or does not fit, impossible value, bad YAML)
raises :class:`ConfigError` with one readable line, before any Ray worker starts.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import yaml

from ctm_dist.model import MODEL_KINDS, CTMConfig, FFConfig, LSTMConfig, QAMNISTConfig
from ctm_dist.model.rl_config import RLAgentConfig
from ctm_dist.tasks import UnknownTask, get_task, task_names

SEED_LIMIT = (
    2**32
)  # run.seed is in [0, 2**32): numpy seeds take it whole, and offsets per rank stay in 64 bits
INT_LIMIT = 2**63  # every integer field fits in a signed 64-bit integer (torch, numpy, DeepSpeed)
UNCATCHABLE_SIGNALS = ("SIGKILL", "SIGSTOP")
# preset arguments that size the output, accepted under model.* beside CTMConfig's fields
PRESET_ARGUMENTS = {"route_length": int, "sequence_length": int}
PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """A config problem, described in one line."""


@dataclass
class RunSection:
    name: str = "demo"
    storage: str = ""  # URL of the run store; "" = the embedded local object store
    seed: int = 0
    max_steps: int = 450
    log_every: int = 25
    local_dir: str = ".ctm-dist"  # scratch: Ray results, embedded store, local TensorBoard copy
    storage_retry_deadline: float = (
        60.0  # seconds a storage call retries transient errors before failing
    )
    preemption_signals: str = "SIGTERM,SIGUSR1"  # signals that mean "checkpoint and exit 75"
    preemption_grace_s: float = 60.0  # time the preemption checkpoint is expected to fit in


@dataclass
class DataSection:
    url: str = ""  # shard set URL; "" = demo shards written into the embedded store
    task: str = "demo"
    batch_size: int = 64  # global batch = micro-batch * workers * grad_accumulation
    eval_batch_size: int = 128  # global, split over workers
    num_workers: int = 0  # dataloader processes per training worker
    image_size: int = 0  # model input size for image tasks; 0 = the shard set's / task's default
    # The global sample order is a function of (seed, epoch) alone: the same global batches for
    # any worker count (every rank reads every shard and decodes its slice); false deals shards to
    # ranks instead (each rank reads only its own, but the batches depend on the worker count).
    global_order: bool = True


@dataclass
class ModelSection:
    # "ctm", or a baseline of the paper: "lstm" (ctm_dist/model/lstm.py), "ff" (model/ff.py)
    kind: str = "ctm"
    preset: str = "demo"
    overrides: dict = field(
        default_factory=dict
    )  # any field of the kind's config, e.g. d_model: 256
    # weights to start from (a checkpoint ctm_dist.load reads: an export, a run, a reference
    # checkpoint, a Hugging Face layout or Hub repo id); "" = fresh weights. A resumed run ignores it.
    init_from: str = ""


@dataclass
class OptimSection:
    lr: float = 2e-3
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 50
    decay_steps: int = 0  # length of the schedule; 0 = run.max_steps
    warmup_start_lr: float = 1e-6
    min_lr: float = 1e-6
    schedule: str = "cosine"


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "bf16"
    grad_accumulation: int = 1
    gradient_clipping: float = 0.0  # explicit: DeepSpeed's own default became 1.0 in 0.19.3


@dataclass
class CheckpointSection:
    every: int = 150  # steps; a final checkpoint is always written
    keep: int = 3


@dataclass
class EvalSection:
    every: int = 150  # steps; 0 = only at the end
    batches: int = 0  # batches per worker per eval; 0 = the whole validation split


@dataclass
class ScaleSection:
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_failures: int = (
        2  # worker-group restarts Ray may do (a bound: Ray's -1, "forever", is refused)
    )


@dataclass
class RLSection:
    """Reinforcement learning (task ``rl``): environments and PPO, names as the reference's options."""

    env_id: str = "CartPole-v1"  # CartPole-v1, Acrobot-v1 or a MiniGrid id (MiniGrid-FourRooms-v0)
    num_envs: int = 64  # environments per worker
    num_steps: int = 32  # steps per environment per rollout
    update_epochs: int = 2  # passes over a rollout; each pass is num_minibatches trainer steps
    num_minibatches: int = 2  # a minibatch is num_envs / num_minibatches environments, all steps
    max_environment_steps: int = 200  # episodes cut here
    mask_velocity: bool = True  # classic control: velocities hidden (the agent needs memory)
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.1
    ent_coef: float = 0.1
    vf_coef: float = 0.25
    norm_adv: bool = True
    clip_vloss: bool = False
    target_kl: float | None = None  # stop a rollout's epochs early once PPO's approx KL exceeds it
    eval_envs: int = 16  # evaluation plays one episode in each (per worker)


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    scale: ScaleSection = field(default_factory=ScaleSection)
    rl: RLSection = field(default_factory=RLSection)

    @property
    def micro_batch_size(self) -> int:
        return self.data.batch_size // (self.scale.workers * self.deepspeed.grad_accumulation)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        cfg = cls()
        _merge(cfg, raw, "")
        return cfg

    def validate(self) -> TrainConfig:
        _validate(self)
        return self


# ---------------------------------------------------------------- coercion


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the annotated type, or raise."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for arg in args[
            :-1
        ]:  # the first type that takes the value, e.g. ``bool | str``: true, false or "auto"
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        return _coerce(value, args[-1], where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "true",
            "yes",
            "on",
            "1",
            "false",
            "no",
            "off",
            "0",
        ):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if hint is tuple or origin is tuple:
        if isinstance(value, str):
            value = _parse_scalar(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, float, where) for v in value)
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _hints(obj: Any) -> dict:
    return typing.get_type_hints(type(obj))


def _merge(obj: Any, raw: Any, prefix: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = _hints(obj)
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if isinstance(obj, ModelSection) and key not in _MODEL_SECTION_FIELDS:
            obj.overrides[str(key)] = _coerce(value, _model_hint(str(key)), f"model.{key}")
            continue
        if key not in hints:
            raise ConfigError(f"unknown config field {where!r} (known: {', '.join(hints)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, where + ".")
        elif isinstance(obj, ModelSection) and key == "overrides":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping, got {value!r}")
            for name, item in value.items():
                obj.overrides[str(name)] = _coerce(item, _model_hint(str(name)), f"model.{name}")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _model_hint(name: str) -> Any:
    """The type of ``model.<name>``: a field of a model kind's config or a preset argument."""
    hint = _MODEL_HINTS.get(name)
    if hint is None:
        raise ConfigError(
            f"unknown config field 'model.{name}' (not a field of any model kind's config)"
        )
    return hint


# the fields of every model kind's and variant's config are accepted under model.*
def _field_hints(cls: type) -> dict:
    """The types of a config dataclass's fields (not its class constants)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


_MODEL_HINTS = {
    **_field_hints(FFConfig),
    **typing.get_type_hints(LSTMConfig),
    **typing.get_type_hints(QAMNISTConfig),
    **typing.get_type_hints(RLAgentConfig),
    **typing.get_type_hints(CTMConfig),
    **PRESET_ARGUMENTS,
}
_MODEL_SECTION_FIELDS = ("kind", "preset", "overrides", "init_from")


def apply_override(cfg: TrainConfig, item: str) -> None:
    """Apply one ``section.field=value`` override (``model.<CTMConfig field>=...`` included)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.field=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {item!r}: expected section.field=value, e.g. optim.lr=1e-3")
    nested: Any = _parse_scalar(text)
    if isinstance(nested, str) or nested is None:
        nested = text  # keep raw text; _coerce turns it into the field's type
    for part in reversed(parts):
        nested = {part: nested}
    _merge(cfg, nested, "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last one silently, so ``lr: 1e-3`` further down a section would quietly win)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    earlier = first.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if earlier is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first given on line {earlier.line + 1})",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"bad YAML in {path}{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, got {type(raw).__name__}"
        )
    return raw


def build_config(
    yaml_path: str | None = None,
    overrides: list[str] = (),
    base: dict | None = None,
    validate: bool = True,
) -> TrainConfig:
    """Defaults <- ``base`` (a launcher's task defaults) <- YAML file <- dotted overrides; validated."""
    cfg = TrainConfig()
    if base:
        _merge(cfg, base, "")
    if yaml_path:
        _merge(cfg, load_yaml(yaml_path), "")
    for item in overrides:
        apply_override(cfg, item)
    return cfg.validate() if validate else cfg


# ---------------------------------------------------------------- validation


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _numbers_fit(value: Any, where: str) -> None:
    """Floats are finite and integers fit in 64 bits, also inside lists, tuples and mappings."""
    if isinstance(value, bool):
        return
    if isinstance(value, float):
        _check(math.isfinite(value), f"{where} must be a finite number, got {value}")
    elif isinstance(value, int):
        _check(-INT_LIMIT <= value < INT_LIMIT, f"{where}={value} does not fit in a 64-bit integer")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _numbers_fit(v, where)
    elif isinstance(value, dict):
        for k, v in value.items():
            _numbers_fit(v, f"{where}.{k}")


def _validate_signals(names: str) -> None:
    wanted = [name.strip() for name in names.split(",")]
    _check(
        all(name in signal.Signals.__members__ for name in wanted),
        f"run.preemption_signals must be signal names such as SIGTERM,SIGUSR1, got {names!r}",
    )
    blocked = [
        name
        for name in wanted
        if name in UNCATCHABLE_SIGNALS or signal.Signals[name] not in signal.valid_signals()
    ]
    _check(
        not blocked,
        f"run.preemption_signals: {', '.join(blocked)} cannot be caught, so it cannot ask "
        f"for a checkpoint; use signals such as SIGTERM,SIGUSR1, got {names!r}",
    )


def _validate(cfg: TrainConfig) -> None:
    r, d, o, ds, ck, ev, sc = (
        cfg.run,
        cfg.data,
        cfg.optim,
        cfg.deepspeed,
        cfg.checkpoint,
        cfg.eval,
        cfg.scale,
    )
    _check(0 <= r.seed < SEED_LIMIT, f"run.seed must be in [0, 2**32), got {r.seed}")
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            where = (
                "model"
                if section.name == "model" and f.name == "overrides"
                else f"{section.name}.{f.name}"
            )
            _numbers_fit(getattr(getattr(cfg, section.name), f.name), where)
    _check(
        bool(r.name) and "/" not in r.name and r.name not in (".", ".."),
        f"run.name must be a non-empty name without '/', got {r.name!r}",
    )
    _check(r.max_steps > 0, f"run.max_steps must be > 0, got {r.max_steps}")
    _check(r.log_every > 0, f"run.log_every must be > 0, got {r.log_every}")
    _check(
        r.storage_retry_deadline > 0,
        f"run.storage_retry_deadline must be > 0, got {r.storage_retry_deadline}",
    )
    _check(
        r.preemption_grace_s > 0, f"run.preemption_grace_s must be > 0, got {r.preemption_grace_s}"
    )
    _validate_signals(r.preemption_signals)
    try:
        task = get_task(d.task)
    except UnknownTask:
        raise ConfigError(
            f"data.task must be one of {', '.join(task_names())}, got {d.task!r}"
        ) from None
    _check(
        d.url != "" or task.built_in_data or task.generated_data,
        f"data.url is required for task {d.task!r} (only {' and '.join(_own_data_tasks())} "
        "have built-in data)",
    )
    _check(sc.workers >= 1, f"scale.workers must be >= 1, got {sc.workers}")
    _check(sc.gpus_per_worker >= 0, f"scale.gpus_per_worker must be >= 0, got {sc.gpus_per_worker}")
    _check(sc.cpus_per_worker > 0, f"scale.cpus_per_worker must be > 0, got {sc.cpus_per_worker}")
    _check(
        sc.max_failures >= 0,
        f"scale.max_failures must be >= 0 (worker-group restarts; unlimited restarts would repeat a "
        f"failure that happens every time without end), got {sc.max_failures}",
    )
    _check(
        ds.grad_accumulation >= 1,
        f"deepspeed.grad_accumulation must be >= 1, got {ds.grad_accumulation}",
    )
    _check(d.batch_size >= 1, f"data.batch_size must be >= 1, got {d.batch_size}")
    per_step = sc.workers * ds.grad_accumulation
    _check(
        d.batch_size % per_step == 0,
        f"data.batch_size={d.batch_size} is not divisible by scale.workers*deepspeed.grad_accumulation="
        f"{sc.workers}*{ds.grad_accumulation}={per_step}",
    )
    _check(
        d.eval_batch_size >= sc.workers and d.eval_batch_size % sc.workers == 0,
        f"data.eval_batch_size={d.eval_batch_size} must be a positive multiple of scale.workers={sc.workers}",
    )
    _check(d.image_size >= 0, f"data.image_size must be >= 0 (0 = default), got {d.image_size}")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    _check(
        ds.zero_stage in (0, 1, 2, 3),
        f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {ds.zero_stage}",
    )
    _check(
        ds.precision in PRECISIONS,
        f"deepspeed.precision must be one of {', '.join(PRECISIONS)}, got {ds.precision!r}",
    )
    _check(
        not ds.offload_optimizer or ds.zero_stage >= 1,
        "deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1",
    )
    _check(
        not ds.offload_params or ds.zero_stage == 3,
        "deepspeed.offload_params needs deepspeed.zero_stage=3",
    )
    _check(
        ds.gradient_clipping >= 0,
        f"deepspeed.gradient_clipping must be >= 0 (0 = off), got {ds.gradient_clipping}",
    )
    _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    _check(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    _check(o.warmup_start_lr >= 0, f"optim.warmup_start_lr must be >= 0, got {o.warmup_start_lr}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas must be two numbers in [0, 1), got {o.betas}",
    )
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(
        o.decay_steps >= 0,
        f"optim.decay_steps must be >= 0 (0 = run.max_steps), got {o.decay_steps}",
    )
    _check(
        o.schedule in SCHEDULES,
        f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {o.schedule!r}",
    )
    _check(0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, optim.lr], got {o.min_lr}")
    _check(ck.every >= 1, f"checkpoint.every must be >= 1, got {ck.every}")
    _check(ck.keep >= 1, f"checkpoint.keep must be >= 1, got {ck.keep}")
    _check(ev.every >= 0, f"eval.every must be >= 0, got {ev.every}")
    _check(ev.batches >= 0, f"eval.batches must be >= 0 (0 = whole split), got {ev.batches}")
    _validate_rl(cfg.rl)
    _validate_model(cfg.model, task)


def _validate_rl(r: RLSection) -> None:
    for name in ("num_envs", "num_steps", "update_epochs", "num_minibatches", "eval_envs"):
        _check(getattr(r, name) >= 1, f"rl.{name} must be >= 1, got {getattr(r, name)}")
    _check(
        r.num_envs % r.num_minibatches == 0,
        f"rl.num_envs ({r.num_envs}) must be a multiple of rl.num_minibatches ({r.num_minibatches})",
    )
    _check(r.max_environment_steps >= 1, "rl.max_environment_steps must be >= 1")
    _check(0.0 < r.gamma <= 1.0 and 0.0 <= r.gae_lambda <= 1.0, "rl.gamma, rl.gae_lambda in (0, 1]")
    for name in ("clip_coef", "ent_coef", "vf_coef"):
        _check(getattr(r, name) >= 0, f"rl.{name} must be >= 0, got {getattr(r, name)}")
    _check(
        r.target_kl is None or r.target_kl > 0,
        f"rl.target_kl must be > 0 (or none: no early stop), got {r.target_kl}",
    )


def _own_data_tasks() -> list[str]:
    return [n for n in task_names() if get_task(n).built_in_data or get_task(n).generated_data]


def _validate_model(m: ModelSection, task) -> None:
    """Check the kind, the preset name and the override names and types against the task's model
    config of that kind (``CTMConfig``, the LSTM's, a variant's or the RL agent's; changes nothing)."""
    _check(
        m.kind in MODEL_KINDS,
        f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {m.kind!r}",
    )
    for key, value in m.overrides.items():
        where = f"model.{key}"
        _check(isinstance(key, str), f"{where}: field names are strings")
        hint = _model_hint(key)
        _check(
            _coerce(value, hint, where) == value,
            f"{where}: expected {_type_name(hint)}, got {value!r}",
        )
    try:
        task.config_for(m.preset, dict(m.overrides), m.kind)
    except (KeyError, ValueError, TypeError) as e:
        msg = str(e).strip("'\"").splitlines()[0] if str(e) else type(e).__name__
        kind = "" if m.kind == "ctm" else f"{m.kind} "
        raise ConfigError(f"model ({kind}preset {m.preset!r}): {msg}") from None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)
