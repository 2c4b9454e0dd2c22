"""Time one CTM training step (forward, certainty loss, backward, AdamW) per preset, on CPU or CUDA.

    python bench/step.py --preset parity --batch 16 --steps 3 --reference /work/ref
    python bench/step.py --preset imagenet --iterations 50 --image-size 96 --batch 2 --checkpointing 0,5,nlms
    python bench/step.py --device cuda --case parity:64 --case imagenet:128:224:50 --dtype bf16 --compile off,on

Variants are the combinations of ``--dtype`` (``fp32``; ``bf16``: bf16 autocast over fp32
parameters; ``bf16p``: bf16 parameters and inputs, as DeepSpeed's bf16 mode runs them),
``--checkpointing`` (tick_checkpointing segment lengths and ``nlms`` for recompute_nlms) and
``--compile`` (``off``/``on``: ``torch.compile`` of the model, through ``CTMConfig.compile`` where
the config has that field). Each variant is timed in turns with a baseline (the reference at the
same dtype with ``--reference DIR``, which imports the reference model from that checkout;
otherwise our eager model at the first dtype listed) so that load changes hit both alike, and
prints one markdown table row:

* step s: median step time over --steps, after one warm-up step whose time is "warm-up s"
  (with --compile on, mostly compilation);
* samples/s: batch / step s; GFLOP: forward+backward FLOPs of the eager model
  (torch.utils.flop_counter); MFU %: those FLOPs per step second over --peak-tflops;
* held MB: bytes autograd keeps for backward at the end of forward (distinct storages saved,
  counted with saved_tensors_hooks, without the model's parameters, plus the segment inputs and
  replay tapes that tick checkpointing keeps; eager model);
* peak MB: on CUDA the step's peak allocated memory (``torch.cuda.max_memory_allocated`` during
  the step, less what was allocated before it, plus this model's parameters and optimizer
  state); on CPU the process's peak RSS during a step;
* speed-up: the baseline's step time over this variant's (median of per-round ratios), "vs"
  names the baseline.

Notes after the table give CPU-time ratios, interquartile ranges and the memory kept across
ticks ("ticks MB": what is saved after the input side).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctm_dist.model import CTM, OUR_FIELDS, CTMConfig, preset  # noqa: E402
from ctm_dist.model.tick_checkpoint import collecting_tapes  # noqa: E402

if hasattr(torch.ops.mkldnn, "_linear_pointwise"):

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _onednn_linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        """The oneDNN linear of ``ctm_dist/model/tick_grads.py``, which torch's counter does not know."""
        return 2 * math.prod(x_shape) * out_shape[-1]


# --- inputs and a minimal certainty loss ---------------------------------------------------------


def make_batch(
    cfg: CTMConfig, name: str, batch: int, image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if cfg.backbone_type == "parity_backbone":
        length = cfg.prediction_reshaper[0]
        x = torch.randint(0, 2, (batch, length), generator=g).float() * 2 - 1
        return x, torch.randint(0, 2, (batch, length), generator=g)
    x = torch.randn(batch, cfg.in_channels, image_size, image_size, generator=g)
    if cfg.prediction_reshaper != [-1]:
        length, classes = cfg.prediction_reshaper
        return x, torch.randint(0, classes, (batch, length), generator=g)
    return x, torch.randint(0, cfg.out_dims, (batch,), generator=g)


def certainty_loss(
    predictions: torch.Tensor, certainties: torch.Tensor, targets: torch.Tensor, reshaper: list[int]
) -> torch.Tensor:
    """Mean of the loss at the lowest-loss tick and at the most certain tick (the paper's loss)."""
    b, _, t = predictions.shape
    classes = predictions.size(1) if reshaper == [-1] else reshaper[-1]
    logits = predictions.reshape(b, -1, classes, t).permute(0, 3, 1, 2)  # [B, T, L, C]
    per_tick = (
        F.cross_entropy(
            logits.flatten(0, 2),
            targets.reshape(b, 1, -1).expand(b, t, -1).flatten(),
            reduction="none",
        )
        .view(b, t, -1)
        .mean(-1)
    )  # [B, T]
    most_certain = certainties[:, 1].argmax(-1)
    rows = torch.arange(b)
    return (per_tick.min(-1).values + per_tick[rows, most_certain]).mean() / 2


# --- measurement -------------------------------------------------------------------------------


def _rss_peak_reset() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)


class SavedBytes:
    """Bytes of distinct storages autograd saves for backward while active, the model's own
    parameters and buffers left out (they are held whether saved or not)."""

    def __init__(self, model: torch.nn.Module):
        self.storages: dict[int, int] = {}
        self.before_ticks = 0.0
        self.held_anyway = {
            t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())
        }

    def mark_ticks_start(self, context) -> None:
        """Called after ``CTM.start``: what the tick context holds (keys, values, the NLM weights
        permuted once per forward) is counted on the input side, whenever a tick first saves it."""
        for tensor in _tensors(context):
            self.pack(tensor)
        self.before_ticks = self.mb

    def pack(self, tensor: torch.Tensor):
        with contextlib.suppress(Exception):
            storage = tensor.untyped_storage()
            if storage.data_ptr() in self.held_anyway:
                return tensor
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def mb(self) -> float:
        return sum(self.storages.values()) / 2**20


def _checkpoint_inputs_mb(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Bytes that tick checkpointing keeps alive: the state entering each segment."""
    k = getattr(getattr(model, "cfg", None), "tick_checkpointing", 0)
    if not k:
        return 0.0
    cfg = model.cfg
    b = x.size(0)
    # TickState: trace [D, M, B], activated [B, D], alpha_action [B, pairs], beta_action [pairs]
    per_state = b * cfg.d_model * (cfg.memory_length + 1) + (b + 1) * cfg.synch_size_action
    segments = -(-cfg.iterations // k)
    return segments * per_state * 4 / 2**20


COLUMNS = [
    "case",
    "model",
    "dtype",
    "compile",
    "recompute",
    "step s",
    "samples/s",
    "GFLOP",
    "MFU %",
    "warm-up s",
    "held MB",
    "peak MB",
    "speed-up",
    "vs",
]
HAS_COMPILE_FIELD = "compile" in {f.name for f in dataclasses.fields(CTMConfig)}
NLMS = "nlms"  # --checkpointing value for recompute_nlms


def table_header() -> str:
    return (
        "| "
        + " | ".join(COLUMNS)
        + " |\n| --- | --- | --- | --- | --- |"
        + " ---: |" * (len(COLUMNS) - 6)
        + " --- |"
    )


def table_row(values: dict) -> str:
    """One markdown row; ``values`` holds COLUMNS' names (missing or NaN: "-")."""

    def cell(name):
        v = values.get(name)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return (
                f"{v:.3f}"
                if name in ("step s", "warm-up s")
                else f"{v:.2f}x"
                if name == "speed-up"
                else f"{v:.1f}"
                if name in ("MFU %", "GFLOP")
                else f"{v:.3g}"
                if name == "samples/s" and v < 100  # below 1 on a slow CPU step
                else f"{v:.0f}"
            )
        return str(v)

    return "| " + " | ".join(cell(c) for c in COLUMNS) + " |"


def autocast_for(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_fn(model, optimizer, x, targets, reshaper, dtype):
    with autocast_for(x.device, dtype):
        predictions, certainties, _ = model(x)[:3]
        loss = certainty_loss(predictions.float(), certainties.float(), targets, reshaper)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.parameters()) + [
        t
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    ]
    return sum(t.nbytes for t in tensors)


class Runner:
    """A model with its AdamW optimiser, timed one training step at a time."""

    def __init__(self, label: str, model, dtype: str, x, targets, reshaper, compiled: bool = False):
        self.label, self.dtype, self.compiled = label, dtype, compiled
        self.device = x.device
        model = model.to(self.device)
        if dtype == "bf16p":
            model = model.to(torch.bfloat16)
            x = x.to(torch.bfloat16) if x.is_floating_point() else x
        self.eager = model
        self.model = torch.compile(model, dynamic=False) if compiled else model
        self.x, self.targets, self.reshaper = x, targets.to(self.device), reshaper
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        self.times: list[float] = []  # wall seconds
        self.cpu_times: list[
            float
        ] = []  # process CPU seconds (all threads): robust to load from others
        self.warmup_s = float("nan")  # the first step's time
        self.peak_mb = float("nan")
        model.train()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, record: bool = True) -> float:
        cuda = self.device.type == "cuda"
        self._sync()
        if cuda:
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step_fn(self.model, self.optimizer, self.x, self.targets, self.reshaper, self.dtype)
        self._sync()
        seconds = time.perf_counter() - start
        if record:
            self.times.append(seconds)
            self.cpu_times.append(time.process_time() - cpu_start)
            if cuda:
                peak = torch.cuda.max_memory_allocated(self.device) - before
                peak += _resident_bytes(self.eager, self.optimizer)
                self.peak_mb = (
                    peak / 2**20 if math.isnan(self.peak_mb) else max(self.peak_mb, peak / 2**20)
                )
        elif math.isnan(self.warmup_s):
            self.warmup_s = seconds
        return seconds

    def flops_and_memory(self) -> dict:
        """FLOPs of one forward+backward and the memory held for backward at the end of forward,
        measured on the eager model (a compiled one computes the same)."""
        model = self.eager
        saved = SavedBytes(model)
        start = getattr(model, "start", None)
        if start is not None:  # ours: split off what the input side (backbone, keys/values) keeps

            def marked_start(*a, **kw):
                result = start(*a, **kw)
                saved.mark_ticks_start(result[1])
                return result

            model.start = marked_start
        _rss_peak_reset()
        with FlopCounterMode(display=False) as counter, collecting_tapes() as tapes:
            rss_before = _rss_mb()
            with (
                torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t),
                autocast_for(self.device, self.dtype),
            ):
                predictions, certainties, _ = model(self.x)[:3]
                loss = certainty_loss(
                    predictions.float(), certainties.float(), self.targets, self.reshaper
                )
            held_rss = _rss_mb() - rss_before
            held = (
                saved.mb
                + _checkpoint_inputs_mb(model, self.x)
                + sum(t.nbytes for t in tapes) / 2**20
            )
            loss.backward()
        if start is not None:
            del model.start
        self.optimizer.zero_grad(set_to_none=True)
        ticks = held - saved.before_ticks if start is not None else float("nan")
        peak = self.peak_mb if self.device.type == "cuda" else _rss_peak_mb()
        return dict(
            gflop=counter.get_total_flops() / 1e9,
            held_mb=held,
            ticks_mb=ticks,
            held_rss_mb=held_rss,
            peak_mb=peak,
        )


def interleaved(runners: list[Runner], steps: int) -> None:
    """Warm every runner up, then time them in turns so that load changes hit all alike."""
    for runner in runners:
        if math.isnan(runner.warmup_s):
            runner.step(record=False)
    for _ in range(steps):
        for runner in runners:
            runner.step()


def round_ratios(slow: Runner, fast: Runner, cpu: bool = False) -> list[float]:
    """slow/fast step time per round (both timed in the same round), sorted."""
    pairs = zip(slow.cpu_times, fast.cpu_times) if cpu else zip(slow.times, fast.times)
    return sorted(a / b for a, b in pairs)


def median_ratio(slow: Runner, fast: Runner, cpu: bool = False) -> float:
    return statistics.median(round_ratios(slow, fast, cpu))


def spread(slow: Runner, fast: Runner, cpu: bool = False) -> str:
    """Median of slow/fast per round and, from 4 rounds up, its interquartile range."""
    ratios = round_ratios(slow, fast, cpu)
    text = f"{statistics.median(ratios):.2f}x"
    if len(ratios) >= 4:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        text += f" (IQR {q1:.2f}..{q3:.2f})"
    return text


def build_reference(reference: Path, cfg: CTMConfig, x: torch.Tensor):
    sys.path.insert(0, str(reference))
    from models.ctm import ContinuousThoughtMachine

    kwargs = {k: v for k, v in cfg.to_dict().items() if k not in OUR_FIELDS}
    with contextlib.redirect_stdout(io.StringIO()):
        model = ContinuousThoughtMachine(**kwargs)
        with torch.no_grad():
            model.eval()
            model(x[:1].cpu())  # materialise lazy layers
    return model


def _checkpointing(value: str) -> int | str:
    return value if value == NLMS else int(value)


def _recompute_name(k: int | str) -> str:
    return "nlms" if k == NLMS else f"ticks/{k}" if k else "-"


def parse_overrides(pairs: list[str], preset_name: str) -> dict:
    """``FIELD=VALUE`` or ``PRESET.FIELD=VALUE`` (only for that preset) CTMConfig overrides; values
    are read as JSON where they parse (numbers, booleans, lists), as text otherwise."""
    known = {f.name for f in dataclasses.fields(CTMConfig)}
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        only, _, field = key.rpartition(".")
        if not sep or field not in known:
            raise SystemExit(
                f"--set {pair!r}: expected [PRESET.]FIELD=VALUE with FIELD one of CTMConfig's fields"
            )
        if only and only != preset_name:
            continue
        key = field
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def model_config(cfg: CTMConfig, k: int | str, compiled: bool) -> CTMConfig:
    cfg = (
        cfg.replace(tick_checkpointing=0, recompute_nlms=True)
        if k == NLMS
        else cfg.replace(tick_checkpointing=k)
    )
    if HAS_COMPILE_FIELD:  # the config decides compilation and the CPU-only gradient banks
        cfg = cfg.replace(compile=compiled)
    return cfg


def parse_case(text: str, args) -> tuple[str, int, int, int | None]:
    """``NAME[:BATCH[:IMAGE_SIZE[:T]]]``; what is left out comes from --batch, --image-size, --iterations."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 4 or not all(p.isdigit() for p in parts[1:]):
        raise SystemExit(f"--case {text!r}: expected NAME[:BATCH[:IMAGE_SIZE[:T]]]")
    numbers = [int(p) for p in parts[1:]] + [None] * (4 - len(parts))
    return (
        parts[0],
        numbers[0] or args.batch,
        numbers[1] or args.image_size,
        numbers[2] if numbers[2] is not None else args.iterations,
    )


def run_preset(case_text: str, args, device: torch.device, notes: list[str]) -> None:
    name, batch, image_size, iterations = parse_case(case_text, args)
    overrides = parse_overrides(args.set, name)
    if iterations is not None:
        overrides["iterations"] = iterations
    cfg = preset(name, **overrides)
    x, targets = make_batch(cfg, name, batch, image_size)
    x = x.to(device)
    case = (
        f"{name} b{batch}"
        + (f" {image_size}px" if x.dim() == 4 else "")
        + (f" T={cfg.iterations}" if iterations is not None else "")
    )
    dtypes = args.dtype.split(",")
    checkpointing = [_checkpointing(v) for v in args.checkpointing.split(",")]
    compiles = [{"off": False, "on": True}[v] for v in args.compile.split(",")]

    def ours(k: int | str, dtype: str, compiled: bool) -> Runner:
        torch.manual_seed(0)
        np.random.seed(0)
        return Runner(
            "ours",
            CTM(model_config(cfg, k, compiled)),
            dtype,
            x,
            targets,
            cfg.prediction_reshaper,
            compiled,
        )

    def row(runner: Runner, k, baseline: Runner | None, vs: str) -> dict:
        stats = runner.flops_and_memory()
        seconds = statistics.median(runner.times)
        values = {
            "case": case,
            "model": runner.label,
            "dtype": runner.dtype,
            "compile": "on" if runner.compiled else "off",
            "recompute": _recompute_name(k),
            "step s": seconds,
            "samples/s": batch / seconds,
            "GFLOP": stats["gflop"],
            "MFU %": 100 * stats["gflop"] * 1e9 / seconds / (args.peak_tflops * 1e12),
            "warm-up s": runner.warmup_s,
            "held MB": stats["held_mb"],
            "peak MB": stats["peak_mb"],
        }
        if baseline is not None:
            values["speed-up"] = median_ratio(baseline, runner)
            values["vs"] = vs
            notes.append(
                f"{case}, {runner.label} {runner.dtype} compile {values['compile']} "
                f"recompute {values['recompute']}: {vs} / this per round: wall {spread(baseline, runner)}, "
                f"CPU time {spread(baseline, runner, cpu=True)}; held across ticks {stats['ticks_mb']:.1f} MB"
            )
        print(table_row(values), flush=True)
        return stats

    plain = None
    for dtype in dtypes:
        if args.reference is not None:
            torch.manual_seed(0)
            np.random.seed(0)
            baseline = Runner(
                "reference",
                build_reference(args.reference, cfg, x),
                dtype,
                x,
                targets,
                cfg.prediction_reshaper,
            )
            vs = f"reference {dtype}"
        else:
            if plain is None:
                plain = ours(checkpointing[0], dtypes[0], compiles[0])
            baseline, vs = plain, f"ours {plain.dtype} {'compiled' if plain.compiled else 'eager'}"
        for k in checkpointing:
            for compiled in compiles:
                if compiled and k != 0:
                    notes.append(
                        f"{case}: recompute {_recompute_name(k)} runs eager only; compile on skipped"
                    )
                    continue
                if baseline is plain and (k, dtype, compiled) == (
                    checkpointing[0],
                    dtypes[0],
                    compiles[0],
                ):
                    interleaved([plain], args.steps)
                    row(plain, k, None, "")
                    continue
                variant = ours(k, dtype, compiled)
                baseline.times.clear()
                baseline.cpu_times.clear()
                interleaved([baseline, variant], args.steps)
                row(variant, k, baseline, vs)
                del variant
        if baseline is not plain:
            row(baseline, 0, None, "")
            del baseline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", default=[], help="preset name (repeatable)")
    parser.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="NAME[:BATCH[:IMAGE_SIZE[:T]]]",
        help="a preset with its own batch, image size and T (repeatable)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=None, help="override T")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[PRESET.]FIELD=VALUE",
        help="override a CTMConfig field of every preset or of the one named (repeatable)",
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per variant (after one warm-up)"
    )
    parser.add_argument(
        "--checkpointing",
        default="0",
        help="comma list of tick_checkpointing values; 'nlms' for recompute_nlms",
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        help="comma list of fp32, bf16 (autocast), bf16p (bf16 parameters)",
    )
    parser.add_argument("--compile", default="off", help="comma list of off, on")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="peak dense TFLOP/s for MFU (default: H200 bf16 dense, 989)",
    )
    parser.add_argument(
        "--reference", type=Path, default=None, help="reference checkout to time alongside"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-header", action="store_true", help="print table rows only")
    parser.add_argument(
        "--exact-rss",
        action="store_true",
        help="map large allocations one by one so RSS columns are exact (slows steps)",
    )
    args = parser.parse_args(argv)
    if not args.preset and not args.case:
        parser.error("give at least one --preset or --case")
    for value in args.dtype.split(","):
        if value not in ("fp32", "bf16", "bf16p"):
            parser.error(f"--dtype: {value!r} is not fp32, bf16 or bf16p")
    for value in args.compile.split(","):
        if value not in ("off", "on"):
            parser.error(f"--compile: {value!r} is not off or on")
    if args.reference is not None and not (args.reference / "models" / "ctm.py").is_file():
        parser.error(f"--reference {args.reference}: no models/ctm.py there")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    print(
        f"torch {torch.__version__}, {where}; MFU against {args.peak_tflops:g} TFLOP/s", flush=True
    )
    if not args.no_header:
        print(table_header(), flush=True)
    notes: list[str] = []
    for case in args.preset + args.case:
        run_preset(case, args, device, notes)
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    # --exact-rss: glibc maps every allocation over 64 KiB on its own, so freed tensors leave RSS and
    # the RSS columns mean something; it also makes every such allocation fault its pages in afresh,
    # which slows steps unlike any real run, so step times are taken without it by default.
    if "--exact-rss" in sys.argv and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    main()
