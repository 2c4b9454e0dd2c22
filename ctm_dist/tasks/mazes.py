"""Mazes: a route through a maze image, trained with the auto-curriculum loss; per-step and
whole-route accuracy, and offline the solving of larger mazes by re-application.

A maze input is an RGB image: walls black, open cells white, the start red and the goal green.
A route is a sequence of moves, 0 up, 1 down, 2 left, 3 right, 4 stay (also the padding).
The model's output [B, route_len * 5, T] reads as a [route_len, 5] choice per tick.

Generalisation follows the reference's analysis: on a maze larger than any seen in training the
model predicts a route from the start, we walk it (skipping moves into walls, up to a fault
tolerance); if it does not reach the goal the last position reached becomes the new start and
the model is applied again, up to ``max_reapplications`` times.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ctm_dist.data import transforms as T
from ctm_dist.data.decode import make_decoder
from ctm_dist.data.index import read_index
from ctm_dist.data.reader import ShardLoader
from ctm_dist.losses import (
    as_sequence_predictions,
    maze_loss,
    maze_route_accuracy,
    maze_step_accuracy,
    most_certain_tick,
    per_position_accuracy,
    per_tick,
    per_tick_accuracy,
    predictions_at_tick,
)
from ctm_dist.model import MAZE_ROUTE_LENGTH

from .base import ShardTask, sequence_loss_per_tick
from .sums import Measure

MOVES = {0: (-1, 0), 1: (1, 0), 2: (0, -1), 3: (0, 1), 4: (0, 0)}
START, GOAL, WALL, OPEN = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def maze_rgb(x: torch.Tensor) -> tuple[np.ndarray, bool]:
    """A maze tensor [3, H, W] in [0, 1] or [-1, 1] -> ([H, W, 3] in {0, 1}, whether it was [-1, 1])."""
    arr = x.detach().float().cpu().numpy().transpose(1, 2, 0)
    signed = bool(arr.min() < -0.25)
    if signed:
        arr = (arr + 1) / 2
    return np.round(np.clip(arr, 0, 1)), signed


def rgb_to_tensor(rgb: np.ndarray, signed: bool, like: torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(rgb.transpose(2, 0, 1).copy()).to(like.dtype)
    return (t * 2 - 1 if signed else t).to(like.device)


def find_cell(rgb: np.ndarray, colour) -> tuple[int, int] | None:
    hits = np.argwhere((rgb == np.asarray(colour)).all(-1))
    return (int(hits[0][0]), int(hits[0][1])) if len(hits) else None


def route_cells(rgb: np.ndarray, route, stop_at_goal: bool = False) -> list[tuple[int, int]]:
    """Cells visited when walking ``route`` from the start, skipping moves into walls or off the grid."""
    pos = find_cell(rgb, START)
    goal = find_cell(rgb, GOAL)
    if pos is None:
        return []
    H, W, _ = rgb.shape
    cells = [pos]
    for move in route:
        dy, dx = MOVES.get(int(move), (0, 0))
        y, x = pos[0] + dy, pos[1] + dx
        if 0 <= y < H and 0 <= x < W and not (rgb[y, x] == 0).all():
            pos = (y, x)
        cells.append(pos)
        if stop_at_goal and pos == goal:
            break
    return cells


@dataclass
class Walk:
    solved: bool
    final: tuple[int, int]
    mistakes: int


def walk_route(rgb: np.ndarray, route, fault_tolerance: int = 0, exclusions=()) -> Walk:
    """Walks a route from the start. Moves into walls or off the grid are mistakes and are skipped;
    the walk stops once mistakes exceed ``fault_tolerance``. ``final`` is the last cell reached
    that is not in ``exclusions`` (cells known to lead nowhere)."""
    pos = find_cell(rgb, START)
    goal = find_cell(rgb, GOAL)
    if pos is None:
        raise ValueError("maze has no start cell")
    H, W, _ = rgb.shape
    mistakes = 0
    final = pos
    for move in route:
        dy, dx = MOVES.get(int(move), (0, 0))
        y, x = pos[0] + dy, pos[1] + dx
        if not (0 <= y < H and 0 <= x < W) or (rgb[y, x] == 0).all():
            mistakes += 1
            if mistakes > fault_tolerance:
                break
            continue
        pos = (y, x)
        if pos == goal:
            return Walk(True, pos, mistakes)
        if pos not in exclusions:
            final = pos
    return Walk(False, final, mistakes)


def split_route(predictions: torch.Tensor) -> torch.Tensor:
    """[B, L*5, T] -> [B, L, 5, T]."""
    B, D, T = predictions.shape
    if D % 5:
        raise ValueError(f"maze outputs must be a multiple of 5, got {D}")
    return predictions.reshape(B, D // 5, 5, T)


class MazeStats(Measure):
    """Per-step and whole-route accuracy per tick and at the most certain tick, as sums.

    ``Mazes.accumulate`` adds the sums training has (step and route accuracy at the most certain
    tick, step accuracy per tick); the others are the same ``ctm_dist.losses`` metrics.
    """

    shape = ("ticks", "route_len")

    def __init__(self, ticks: int, route_len: int):
        super().__init__()
        self.ticks, self.route_len = ticks, route_len

    @torch.no_grad()
    def update(self, predictions, certainties, targets, inputs=None) -> None:
        routes = split_route(predictions.float().cpu())  # [B, L, 5, T]
        targets = targets.long().cpu()
        B, L, _, T = routes.shape
        if (L, T) != (self.route_len, self.ticks):
            raise ValueError(f"expected route {self.route_len} x {self.ticks} ticks, got {L} x {T}")
        best = most_certain_tick(certainties.float().cpu())
        Mazes.accumulate(self.sums, routes, targets, torch.ones(B), best)
        add = self.sums.add
        add("step_hits_certain", per_position_accuracy(routes, targets, best, reduction="sum"))
        add("route_hits", per_tick(maze_route_accuracy, routes, targets, reduction="sum"))  # [T]
        add("most_certain_tick", torch.bincount(best, minlength=T))
        if inputs is not None:
            moves = predictions_at_tick(routes, best).argmax(2)  # [B, L]
            solved = 0
            for i in range(B):
                rgb, _ = maze_rgb(inputs[i])
                solved += int(walk_route(rgb, moves[i].numpy(), fault_tolerance=0).solved)
            add("solved_certain", solved)
        add("samples", B)

    def summary(self) -> dict:
        n = max(self.n, 1)
        s = self.sums
        solved = s.get("solved_certain", torch.zeros(1))
        return {
            "samples": self.n,
            "ticks": self.ticks,
            "route_len": self.route_len,
            "step_accuracy_per_tick": (s["per_tick_correct"] / n).tolist(),
            "route_accuracy_per_tick": (s["route_hits"] / n).tolist(),
            "step_accuracy_per_position": (s["step_hits_certain"] / n).tolist(),
            "step_accuracy": float(s["correct"][0] / n),
            "route_accuracy": float(s["route"][0] / n),
            "solved": float(solved[0] / n),
            "most_certain_tick_histogram": s["most_certain_tick"].long().tolist(),
        }


@torch.no_grad()
def solve_by_reapplication(
    model,
    maze: torch.Tensor,
    max_reapplications: int = 20,
    fault_tolerance: int = 2,
    keep_frames: bool = False,
) -> dict:
    """Solves one maze [3, H, W] by applying the model repeatedly from the last position reached.

    Returns {"solved", "reapplications", "route_length", "path"} where ``path`` is the list of cells
    walked over all applications; with ``keep_frames`` also "routes": per application the predicted
    moves at every tick ([T, L] arrays) and the maze image it was applied to.
    """
    rgb, signed = maze_rgb(maze)
    current = rgb.copy()
    exclusions: list[tuple[int, int]] = []
    path: list[tuple[int, int]] = []
    applications: list[dict] = []
    solved = False
    used = 0
    while not solved and used < max_reapplications:
        used += 1
        x = rgb_to_tensor(current, signed, maze)[None]
        predictions, certainties, _ = model(x)[:3]
        moves = split_route(predictions.float()).argmax(2)[0].cpu()  # [L, T]
        best = int(most_certain_tick(certainties)[0])
        route = moves[:, best].numpy()
        if keep_frames:
            applications.append(
                {"maze": current.copy(), "moves": moves.T.numpy(), "chosen_tick": best}
            )
        start = find_cell(current, START)
        walk = walk_route(current, route, fault_tolerance, exclusions)
        cells = route_cells(current, route, stop_at_goal=True)
        path.extend(cells if not path else cells[1:])
        if walk.solved:
            solved = True
            break
        if walk.final == start:
            exclusions.append(start)
        current[start] = OPEN
        current[walk.final] = START
    out = {"solved": solved, "reapplications": used, "path": path}
    if keep_frames:
        out["applications"] = applications
    return out


class GeneralisationStats(Measure):
    """Success and re-applications needed, by optimal route length, as sums."""

    def add(self, route_length: int, result: dict) -> None:
        solved = bool(result["solved"])
        self.sums.add(
            f"length/{int(route_length)}",
            [1, int(solved), result["reapplications"] if solved else 0],
        )

    def summary(self) -> dict:
        rows = {int(name.split("/")[1]): v.tolist() for name, v in self.sums.sums.items()}
        lengths = sorted(rows)
        total = sum(rows[k][0] for k in lengths)
        solved = sum(rows[k][1] for k in lengths)
        return {
            "mazes": int(total),
            "solved": solved / total if total else float("nan"),
            "by_route_length": [
                {
                    "route_length": k,
                    "mazes": int(rows[k][0]),
                    "solved": rows[k][1] / rows[k][0],
                    "mean_reapplications_when_solved": rows[k][2] / rows[k][1]
                    if rows[k][1]
                    else None,
                }
                for k in lengths
            ],
        }


# ---------------------------------------------------------------- the task


class Mazes(ShardTask):
    """Loss with auto-curriculum; per-step and whole-route accuracy at the most-certain tick.

    The route length (a ``model.route_length`` override, else the shard set's, else the preset's
    default) is settled in ``__init__``, so the model's output and every loader's targets have the
    same length whatever is built first.
    """

    name = "mazes"
    image_inputs = True
    pictures = frozenset({"route"})
    headline = {"train": "accuracy", "eval": "step_accuracy"}
    rates = {"route_accuracy": "route", "per_tick_accuracy": "per_tick_correct"}
    launch_defaults = {
        "run": {"name": "mazes", "max_steps": 1_000_000, "log_every": 100},
        "data": {"task": "mazes", "batch_size": 64, "eval_batch_size": 128, "num_workers": 4},
        "model": {"preset": "mazes"},
        "optim": {"lr": 1e-4, "warmup_steps": 10_000, "min_lr": 1e-7, "warmup_start_lr": 1e-20},
        "checkpoint": {"every": 1000},
        "eval": {"every": 1000, "batches": 20},
    }
    run_presets = {
        # small mazes and the first moves of their routes: learns on two CPU cores in minutes
        # (docs/small-presets.md)
        "mazes-small": {
            "run": {"name": "mazes-small", "max_steps": 600, "log_every": 50},
            "data": {"batch_size": 32, "eval_batch_size": 256, "num_workers": 0},
            "model": {"preset": "mazes-small"},
            "optim": {"lr": 1e-3, "warmup_steps": 100, "min_lr": 1e-5, "warmup_start_lr": 1e-6},
            "deepspeed": {"gradient_clipping": 1.0},
            "checkpoint": {"every": 300},
            "eval": {"every": 150, "batches": 1},
        },
    }

    def __init__(self, cfg, rank, world_size):
        super().__init__(cfg, rank, world_size)
        length = cfg.model.overrides.get("route_length") or self.meta.get("route_length")
        self.route_length = int(length) if length else MAZE_ROUTE_LENGTH

    def data_overrides(self):
        return {"route_length": self.route_length}

    def loader_options(self):
        return {"route_length": self.route_length}

    def loss(self, predictions, certainties, target, valid):
        loss, tick, _ = maze_loss(predictions, certainties, target, weight=valid)
        return loss, tick

    @classmethod
    def accumulate(cls, sums, predictions, target, valid, tick, eval=False):
        """A class method: ``MazeStats`` counts offline with it."""
        seq = as_sequence_predictions(predictions, target)
        sums.add("correct", maze_step_accuracy(seq, target, tick, weight=valid, reduction="sum"))
        sums.add("route", maze_route_accuracy(seq, target, tick, weight=valid, reduction="sum"))
        sums.add("per_tick_correct", per_tick_accuracy(seq, target, weight=valid, reduction="sum"))

    @classmethod
    def target_length(cls, model_cfg):
        return model_cfg.out_dims // 5

    @classmethod
    def evaluation_measures(cls, model_cfg, req):
        return {"mazes": MazeStats(model_cfg.iterations, cls.target_length(model_cfg))}

    @classmethod
    def evaluation_extras(cls, model, req, locate, rank, world_size, model_meta=None):
        """With ``req.generalise_data``: re-application on (larger) mazes of that shard set,
        ``req.generalise_mazes`` per worker; success by optimal route length."""
        if not req.generalise_data:
            return {}
        location = locate("generalise_data")
        meta = read_index(location, req.generalise_split).meta
        loader = ShardLoader(
            location,
            req.generalise_split,
            task=cls.name,
            batch_size=1,
            rank=rank,
            world_size=world_size,
            train=False,
            route_length=int(meta.get("route_length") or 1000),
        )
        out = GeneralisationStats()
        done = 0
        for batch in loader:
            if done >= req.generalise_mazes:
                break
            if not bool(batch["valid"][0]):
                continue
            x, y = batch["input"][0].float(), batch["target"][0]
            result = solve_by_reapplication(model, x, req.max_reapplications, req.fault_tolerance)
            out.add(int((y != 4).sum()), result)
            done += 1
        return {"generalisation": out}

    @classmethod
    def input_pipeline(cls, meta, image_size):
        decoder = make_decoder(cls.name, False, meta or {}, image_size=image_size)
        return decoder.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # maze_to_tensor: [-1, 1]

    @classmethod
    def image_tensor(cls, path, data, image_size, mean, std):
        try:
            with Image.open(io.BytesIO(data)) as img:
                return T.maze_to_tensor(np.asarray(img.convert("RGB"), dtype=np.uint8))
        except Exception as e:  # PIL raises many types for files it cannot read
            raise ValueError(f"{path}: not an image ({type(e).__name__})") from None

    @classmethod
    def display_rgb(cls, x):
        return np.clip((x.detach().float().cpu().numpy().transpose(1, 2, 0) + 1) / 2, 0, 1)

    @classmethod
    def per_tick_loss(cls, predictions, targets):
        return sequence_loss_per_tick(predictions, targets, 5)
