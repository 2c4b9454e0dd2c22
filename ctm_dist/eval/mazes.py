"""Maze evaluation: per-step and whole-route accuracy, and solving larger mazes by re-application.

A maze input is an RGB image: walls black, open cells white, the start red and the goal green.
A route is a sequence of moves, 0 up, 1 down, 2 left, 3 right, 4 stay (also the padding).
The model's output [B, route_len * 5, T] reads as a [route_len, 5] choice per tick.

Generalisation follows the reference's analysis: on a maze larger than any seen in training the
model predicts a route from the start, we walk it (skipping moves into walls, up to a fault
tolerance); if it does not reach the goal the last position reached becomes the new start and
the model is applied again, up to ``max_reapplications`` times.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

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


@dataclass
class MazeStats:
    """Per-step and whole-route accuracy per tick and at the most certain tick; sums that merge."""

    ticks: int
    route_len: int
    n: int = 0
    step_hits: np.ndarray | None = None  # [T, L] correct moves per position per tick
    route_hits: np.ndarray | None = None  # [T] whole routes correct
    step_hits_certain: np.ndarray | None = None  # [L]
    route_hits_certain: float = 0.0
    solved_certain: float = 0.0  # walked route reaches the goal without mistakes
    most_certain_tick_counts: np.ndarray | None = None

    def __post_init__(self):
        T, L = self.ticks, self.route_len
        self.step_hits = np.zeros((T, L)) if self.step_hits is None else self.step_hits
        self.route_hits = np.zeros(T) if self.route_hits is None else self.route_hits
        self.step_hits_certain = (
            np.zeros(L) if self.step_hits_certain is None else self.step_hits_certain
        )
        if self.most_certain_tick_counts is None:
            self.most_certain_tick_counts = np.zeros(T)

    @torch.no_grad()
    def update(self, predictions, certainties, targets, inputs: torch.Tensor | None = None) -> None:
        moves = split_route(predictions.float().cpu()).argmax(2)  # [B, L, T]
        targets = targets.long().cpu()
        B, L, T = moves.shape
        if (L, T) != (self.route_len, self.ticks):
            raise ValueError(f"expected route {self.route_len} x {self.ticks} ticks, got {L} x {T}")
        correct = moves == targets[:, :, None]  # [B, L, T]
        self.step_hits += correct.sum(0).T.double().numpy()
        self.route_hits += correct.all(1).sum(0).double().numpy()
        best = certainties[:, 1].float().cpu().argmax(-1)
        chosen = correct[torch.arange(B), :, best]  # [B, L]
        self.step_hits_certain += chosen.sum(0).double().numpy()
        self.route_hits_certain += float(chosen.all(1).sum())
        self.most_certain_tick_counts += np.bincount(best.numpy(), minlength=T)
        if inputs is not None:
            for i in range(B):
                rgb, _ = maze_rgb(inputs[i])
                route = moves[i, :, best[i]].numpy()
                self.solved_certain += float(walk_route(rgb, route, fault_tolerance=0).solved)
        self.n += B

    def merge(self, other: MazeStats) -> MazeStats:
        for name in ("step_hits", "route_hits", "step_hits_certain", "most_certain_tick_counts"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.route_hits_certain += other.route_hits_certain
        self.solved_certain += other.solved_certain
        self.n += other.n
        return self

    def summary(self) -> dict:
        n = max(self.n, 1)
        return {
            "samples": self.n,
            "ticks": self.ticks,
            "route_len": self.route_len,
            "step_accuracy_per_tick": (self.step_hits.mean(1) / n).tolist(),
            "route_accuracy_per_tick": (self.route_hits / n).tolist(),
            "step_accuracy_per_position": (self.step_hits_certain / n).tolist(),
            "step_accuracy": float(self.step_hits_certain.mean() / n),
            "route_accuracy": float(self.route_hits_certain / n),
            "solved": float(self.solved_certain / n),
            "most_certain_tick_histogram": self.most_certain_tick_counts.astype(int).tolist(),
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
        best = int(certainties[0, 1].argmax())
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


@dataclass
class GeneralisationStats:
    """Success and re-applications needed, by optimal route length; merges across workers."""

    by_length: dict = field(
        default_factory=dict
    )  # length -> [count, solved, reapplications on success]

    def add(self, route_length: int, result: dict) -> None:
        row = self.by_length.setdefault(int(route_length), [0, 0, 0])
        row[0] += 1
        row[1] += int(result["solved"])
        row[2] += result["reapplications"] if result["solved"] else 0

    def merge(self, other: GeneralisationStats) -> GeneralisationStats:
        for length, (c, s, r) in other.by_length.items():
            row = self.by_length.setdefault(length, [0, 0, 0])
            row[0] += c
            row[1] += s
            row[2] += r
        return self

    def summary(self) -> dict:
        lengths = sorted(self.by_length)
        total = sum(self.by_length[k][0] for k in lengths)
        solved = sum(self.by_length[k][1] for k in lengths)
        return {
            "mazes": total,
            "solved": solved / total if total else float("nan"),
            "by_route_length": [
                {
                    "route_length": k,
                    "mazes": self.by_length[k][0],
                    "solved": self.by_length[k][1] / self.by_length[k][0],
                    "mean_reapplications_when_solved": self.by_length[k][2] / self.by_length[k][1]
                    if self.by_length[k][1]
                    else None,
                }
                for k in lengths
            ],
        }
