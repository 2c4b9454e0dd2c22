"""Time one CTM training step (forward, certainty loss, backward, AdamW) per preset.

    python bench/step.py --preset parity --batch 16 --steps 3 --reference /work/ref
    python bench/step.py --preset imagenet --iterations 50 --image-size 96 --batch 2 --checkpointing 0,5,nlms

``--checkpointing`` takes tick_checkpointing segment lengths and ``nlms`` (recompute_nlms).
For every combination of --checkpointing and --dtype it prints the median step time over
--steps (after one warm-up step), FLOPs per step (torch.utils.flop_counter), achieved GFLOP/s,
the memory held for backward at the end of forward ("held": bytes of the distinct storages
autograd saved, counted with saved_tensors_hooks, except the model's parameters, plus the segment
inputs and replay tapes that tick checkpointing keeps; "ticks": the part saved after the input
side, i.e. across ticks; "RSS+": growth of the process's resident memory over the forward, which
also sees what checkpointing caches), and the
peak RSS of a step. ``--reference DIR`` also times the reference implementation (imported from
that checkout) on the same configuration and batch and prints the speed ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

def make_batch(cfg: CTMConfig, name: str, batch: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def certainty_loss(predictions: torch.Tensor, certainties: torch.Tensor, targets: torch.Tensor,
                   reshaper: list[int]) -> torch.Tensor:
    """Mean of the loss at the lowest-loss tick and at the most certain tick (the paper's loss)."""
    b, _, t = predictions.shape
    classes = predictions.size(1) if reshaper == [-1] else reshaper[-1]
    logits = predictions.reshape(b, -1, classes, t).permute(0, 3, 1, 2)          # [B, T, L, C]
    per_tick = F.cross_entropy(logits.flatten(0, 2), targets.reshape(b, 1, -1).expand(b, t, -1).flatten(),
                               reduction="none").view(b, t, -1).mean(-1)       # [B, T]
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
        self.held_anyway = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

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


def step_fn(model, optimizer, x, targets, reshaper, dtype):
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    with autocast:
        predictions, certainties, _ = model(x)[:3]
        loss = certainty_loss(predictions.float(), certainties.float(), targets, reshaper)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


class Runner:
    """A model with its AdamW optimiser, timed one training step at a time."""

    def __init__(self, label: str, model, dtype: str, x, targets, reshaper):
        self.label, self.model, self.dtype = label, model, dtype
        self.x, self.targets, self.reshaper = x, targets, reshaper
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        self.times: list[float] = []       # wall seconds
        self.cpu_times: list[float] = []   # process CPU seconds (all threads): robust to load from others
        model.train()

    def step(self, record: bool = True) -> float:
        start, cpu_start = time.perf_counter(), time.process_time()
        step_fn(self.model, self.optimizer, self.x, self.targets, self.reshaper, self.dtype)
        seconds = time.perf_counter() - start
        if record:
            self.times.append(seconds)
            self.cpu_times.append(time.process_time() - cpu_start)
        return seconds

    def flops_and_memory(self) -> dict:
        """FLOPs of one forward+backward and the memory held for backward at the end of forward."""
        saved = SavedBytes(self.model)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.dtype == "bf16" else contextlib.nullcontext()
        start = getattr(self.model, "start", None)
        if start is not None:   # ours: split off what the input side (backbone, keys/values) keeps
            def marked_start(*a, **kw):
                result = start(*a, **kw)
                saved.mark_ticks_start(result[1])
                return result
            self.model.start = marked_start
        _rss_peak_reset()
        with FlopCounterMode(display=False) as counter, collecting_tapes() as tapes:
            rss_before = _rss_mb()
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), autocast:
                predictions, certainties, _ = self.model(self.x)[:3]
                loss = certainty_loss(predictions.float(), certainties.float(), self.targets, self.reshaper)
            held_rss = _rss_mb() - rss_before
            held = saved.mb + _checkpoint_inputs_mb(self.model, self.x) + sum(t.nbytes for t in tapes) / 2**20
            loss.backward()
        if start is not None:
            del self.model.start
        self.optimizer.zero_grad(set_to_none=True)
        ticks = held - saved.before_ticks if start is not None else float("nan")
        return dict(gflop=counter.get_total_flops() / 1e9, held_mb=held, ticks_mb=ticks, held_rss_mb=held_rss,
                    peak_rss_mb=_rss_peak_mb())


def interleaved(runners: list[Runner], steps: int) -> None:
    """Warm every runner up, then time them in turns so that load changes hit all alike."""
    for runner in runners:
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


def extra_time(slow: Runner, fast: Runner, cpu: bool = False) -> str:
    """Median extra step time of ``slow`` over ``fast`` and, from 4 rounds up, its interquartile range."""
    ratios = round_ratios(slow, fast, cpu)
    text = f"{statistics.median(ratios) - 1:+.0%}"
    if len(ratios) >= 4:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        text += f" (IQR {q1 - 1:+.0%}..{q3 - 1:+.0%})"
    return text


def build_reference(reference: Path, cfg: CTMConfig, x: torch.Tensor):
    sys.path.insert(0, str(reference))
    from models.ctm import ContinuousThoughtMachine
    kwargs = {k: v for k, v in cfg.to_dict().items() if k not in OUR_FIELDS}
    with contextlib.redirect_stdout(io.StringIO()):
        model = ContinuousThoughtMachine(**kwargs)
        with torch.no_grad():
            model.eval()
            model(x[:1])                                                 # materialise lazy layers
    return model


NLMS = "nlms"  # --checkpointing value for recompute_nlms


def _checkpointing(value: str) -> int | str:
    return value if value == NLMS else int(value)


def report(runner: Runner, k: int | str, stats: dict) -> None:
    seconds = statistics.median(runner.times)
    cpu = statistics.median(runner.cpu_times)
    print(f"{runner.label:<10} {runner.dtype:>5} {k:>4} {seconds:8.2f} {cpu:8.2f} {stats['gflop']:8.1f} "
          f"{stats['gflop'] / cpu:8.1f} {stats['held_mb']:9.1f} {stats['ticks_mb']:9.1f} {stats['held_rss_mb']:9.1f} "
          f"{stats['peak_rss_mb']:10.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", required=True, help="preset name (repeatable)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=None, help="override T")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--checkpointing", default="0",
                        help="comma list of tick_checkpointing values; 'nlms' for recompute_nlms")
    parser.add_argument("--dtype", default="fp32", help="comma list of fp32,bf16")
    parser.add_argument("--reference", type=Path, default=None, help="reference checkout to time alongside")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--exact-rss", action="store_true",
                        help="map large allocations one by one so RSS columns are exact (slows steps)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for name in args.preset:
        overrides = {} if args.iterations is None else {"iterations": args.iterations}
        cfg = preset(name, **overrides)
        x, targets = make_batch(cfg, name, args.batch, args.image_size)
        print(f"\n== {name}: batch {args.batch}, input {tuple(x.shape)}, T={cfg.iterations}")
        print(f"{'model':<10} {'dtype':>5} {'ckpt':>4} {'step s':>8} {'cpu s':>8} {'GFLOP':>8} {'GF/cpu-s':>8} {'held MB':>9} "
              f"{'ticks MB':>9} {'RSS+ MB':>9} {'peakRSS MB':>10}")

        def ours(k: int | str, dtype: str) -> Runner:
            torch.manual_seed(0)
            np.random.seed(0)
            model = CTM(cfg.replace(tick_checkpointing=0, recompute_nlms=True) if k == NLMS
                        else cfg.replace(tick_checkpointing=k))
            return Runner("ours", model, dtype, x, targets, cfg.prediction_reshaper)

        base = ours(0, "fp32")
        if args.reference is not None:   # side by side: ours and the reference in alternating steps
            torch.manual_seed(0)
            np.random.seed(0)
            ref = Runner("reference", build_reference(args.reference, cfg, x), "fp32", x, targets,
                         cfg.prediction_reshaper)
            interleaved([base, ref], args.steps)
            report(base, 0, base.flops_and_memory())
            report(ref, 0, ref.flops_and_memory())
            print(f"speed-up ours vs reference (fp32, median of per-round ratios): wall {median_ratio(ref, base):.2f}x, "
                  f"CPU time {median_ratio(ref, base, cpu=True):.2f}x")
            del ref
        variants = [(k, d) for d in args.dtype.split(",") for k in map(_checkpointing, args.checkpointing.split(","))
                    if (k, d) != (0, "fp32")]
        if args.reference is None:
            interleaved([base], args.steps)
            report(base, 0, base.flops_and_memory())
        base_stats = base.flops_and_memory()
        for k, dtype in variants:   # each variant alternates with the plain fp32 model
            base.times.clear()
            base.cpu_times.clear()
            variant = ours(k, dtype)
            interleaved([base, variant], args.steps)
            stats = variant.flops_and_memory()
            report(variant, k, stats)
            print(f"   vs plain fp32 in the same rounds: step time {extra_time(variant, base)} wall, "
                  f"{extra_time(variant, base, cpu=True)} CPU, "
                  f"held for backward {stats['held_mb'] / base_stats['held_mb']:.0%} "
                  f"(across ticks {stats['ticks_mb'] / base_stats['ticks_mb']:.0%}; "
                  f"RSS growth over forward {stats['held_rss_mb'] / base_stats['held_rss_mb']:.0%})")
            del variant


if __name__ == "__main__":
    # --exact-rss: glibc maps every allocation over 64 KiB on its own, so freed tensors leave RSS and
    # the RSS columns mean something; it also makes every such allocation fault its pages in afresh,
    # which slows steps unlike any real run, so step times are taken without it by default.
    if "--exact-rss" in sys.argv and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    main()
