"""The settings of `mctool experts` (and the seed check every command shares); no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mctool.configs.choices import DEFAULT_STRATEGY, STRATEGIES
from mctool.core.errors import UsageError
from mctool.core.settings import setting

MAX_SEED = 2**63 - 1


def check_seed(seed: int, option: str = "--seed") -> None:
    """Seeds feed numpy's SeedSequence and torch.manual_seed: 0 … 2**63 − 1."""
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{option} must be in 0 … {MAX_SEED} (2**63 − 1), got {seed}")


@dataclass(frozen=True)
class ExpertsConfig:
    """Options of `mctool experts`; all but num_experts must match to append to a buffer."""

    dataset: str = setting("", "cifar10, cifar100, tinyimagenet, fashion-mnist, mnist or folder:PATH.", option=False)
    num_experts: int = setting(1, "Number of experts the buffer should hold (appends to an existing one). Under "
                               "torchrun write --num-experts (torchrun takes --n for itself).",
                               flags=("--n", "-n", "--num-experts"))
    epochs: int = setting(50, "Epochs per expert (K); K+1 snapshots are kept.")
    lr: float = setting(0.01, "SGD learning rate.")
    momentum: float = setting(0.0, "SGD momentum.")
    weight_decay: float = setting(0.0, "SGD weight decay.")
    batch_size: int = setting(256, "Training batch size.")
    width: int = setting(128, "ConvNet width (channels).")
    depth: int = setting(0, "ConvNet depth (0: 3 up to 64 px — the MCT authors' Tiny ImageNet setting; MTT used "
                         "--depth 4 there — and 5 above).")
    norm: str = "instancenorm"
    zca: bool = setting(True, "ZCA whitening (Table A) or mean/std normalisation.", flags=("--zca/--no-zca",))
    zca_eps: float = setting(0.1, "ZCA epsilon (kornia's ZCAWhitening eps; the reference's 0.1).")
    augment: str = setting(DEFAULT_STRATEGY, "DSA ops joined by '_', or 'none'.")
    seed: int = setting(0, "Run seed (0 … 2**63-1); expert i uses a seed spawned from (seed, i).")
    # --convexify: waypoints and beta computed while training, no full trajectory stored.
    convexify: bool = setting(False, "Stream: compute waypoints + beta while training and never store the full "
                              "trajectory (positions must be known up front: --interior/--positions).")
    interior: int | None = setting(None, "With --convexify: interior waypoints, uniformly placed (default 2).")
    positions: str | None = setting(None, "With --convexify: explicit positions, e.g. 0,17,34,50.")
    beta: str | None = setting(None, "With --convexify: mct (default), uniform, decreasing or projected.")
    smooth: bool = setting(False, "With --convexify: the authors' code's waypoint smoothing.")

    def validate(self) -> None:
        """Refuse settings that cannot train (one line, exit 2); needs no data, so callers check
        before any download or file. The depth is checked when the model is built."""
        from mctool.data.augment import DSA
        from mctool.training.train import Schedule

        Schedule(epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                 batch_size=self.batch_size)
        checks = [("--n", self.num_experts >= 1, ">= 1"), ("--epochs", self.epochs >= 1, ">= 1"),
                  ("--width", self.width >= 1, ">= 1"), ("--depth", self.depth >= 0, ">= 1 (0 = by image size)"),
                  ("--zca-eps", self.zca_eps > 0 and self.zca_eps == self.zca_eps, "> 0")]
        for option, ok, requirement in checks:
            if not ok:
                raise UsageError(f"{option} must be {requirement}, got {getattr(self, option[2:].replace('-', '_'), '')}")
        check_seed(self.seed)
        if self.augment != "none":
            DSA(self.augment)
        if not self.convexify and (self.interior is not None or self.positions is not None or self.beta is not None
                                   or self.smooth):
            raise UsageError("--interior, --positions, --beta and --smooth only apply with --convexify "
                             "(or run `mctool convexify` on the buffer afterwards)")
        if self.convexify:
            self.stream_positions()

    @property
    def stream_strategy(self) -> str:
        """The β strategy of a streaming buffer."""
        return self.beta or "mct"

    def stream_positions(self) -> tuple[int, ...] | None:
        """Waypoint positions of a streaming (`--convexify`) buffer, else None."""
        from mctool.convexify.trajectory import parse_positions, uniform_positions

        if not self.convexify:
            return None
        if self.stream_strategy not in STRATEGIES:
            raise UsageError(f"unknown --beta '{self.stream_strategy}'; choose from {', '.join(STRATEGIES)}")
        if self.interior is not None and self.interior < 0:
            raise UsageError(f"--interior must be >= 0, got {self.interior}")
        if self.positions:
            return tuple(parse_positions(self.positions, self.epochs))
        return tuple(uniform_positions(self.epochs, 2 if self.interior is None else self.interior))

    def compat(self) -> dict[str, Any]:
        """Everything that must agree between runs appending to the same buffer (the keys stored
        in /experts' config since the first release)."""
        positions = self.stream_positions()
        return {
            "dataset": self.dataset, "epochs": self.epochs, "lr": self.lr, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "batch_size": self.batch_size, "width": self.width,
            "depth": self.depth, "norm": self.norm, "zca": self.zca, "zca_eps": self.zca_eps,
            "augment": self.augment, "seed": self.seed,
            "stream_positions": list(positions) if positions else None,
            "stream_strategy": self.stream_strategy, "stream_smooth": self.smooth,
        }
