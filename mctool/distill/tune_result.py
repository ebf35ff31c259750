"""What `--tune` found: each candidate's learning curve and the search's result (plain data, shared
by the search in tune.py and the preset writer in tune_preset.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Candidate:
    """One setting, its learning curve on the validation split, and what became of it."""

    stage: str
    values: dict[str, Any]  # the tuned settings
    mean: float | None = None  # validation accuracy at its last scored horizon
    std: float | None = None
    runs: int = 0
    alpha: float | None = None  # the learned step size there
    seconds: float = 0.0  # distilling and scoring it, in all
    note: str = ""  # why it stopped early: diverged, not run, budget
    curve: list[dict[str, Any]] = field(default_factory=list)  # {iteration, mean, std, runs, alpha} per horizon
    reached: int = 0  # iterations distilled so far
    dead: bool = False  # diverged, invalid or stopped: never continued

    def at(self, iteration: int) -> dict[str, Any] | None:
        """Its score at `iteration`, if it was scored there."""
        return next((p for p in self.curve if p["iteration"] == iteration), None)


@dataclass
class TuneResult:
    """What the search did and found."""

    buffer: str
    dataset: str
    ipc: int
    base: dict[str, Any]  # the settings searched around
    best: dict[str, Any]  # the winner: every setting of the winning DistillConfig
    best_index: int
    candidates: list[Candidate]
    random_real: dict[str, Any] | None  # the starting real images (iteration 0), same protocol, lr = lr_init
    iterations: int  # the chosen candidate's last scored horizon
    val_images: int
    budget_s: float
    seconds: float
    probe: dict[str, float]
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    preset: str | None = None  # the preset file written
    horizons: list[int] = field(default_factory=list)  # the brackets' rungs, then the winner's own
    plan: dict[str, Any] = field(default_factory=dict)
