"""The settings of `mctool experts` (and the seed check every command shares); no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mctool.configs.choices import DEFAULT_STRATEGY, augment_problem
from mctool.configs.convexify import BETA
from mctool.core.errors import UsageError
from mctool.core.settings import Check, above, at_least, between, first_problem, setting

MAX_SEED = 2**63 - 1

# Checks more than one command declares. Seeds feed numpy's SeedSequence and torch.manual_seed.
SEED = between(0, MAX_SEED, f"in 0 … {MAX_SEED} (2**63 − 1)")
LR = above(0, "a finite number > 0")  # a training learning rate (the words of training.train.Schedule)
AUGMENT = Check(lambda v: augment_problem(v) is None, "a DSA strategy", augment_problem)


def check_seed(seed: int, option: str = "--seed") -> None:
    """A seed outside 0 … 2**63 − 1 is one usage line (for commands whose seed is no setting)."""
    if not SEED.ok(seed):
        raise UsageError(f"{option} must be {SEED.words}, got {seed}")


@dataclass(frozen=True)
class ExpertsConfig:
    """Options of `mctool experts`; all but num_experts must match to append to a buffer."""

    dataset: str = setting("", "cifar10, cifar100, tinyimagenet, fashion-mnist, mnist or folder:PATH.", option=False)
    num_experts: int = setting(1, "Number of experts the buffer should hold (appends to an existing one). Under "
                               "torchrun write --num-experts (torchrun takes --n for itself).",
                               flags=("--n", "-n", "--num-experts"), check=at_least(1))
    epochs: int = setting(50, "Epochs per expert (K); K+1 snapshots are kept.", check=at_least(1))
    lr: float = setting(0.01, "SGD learning rate.", check=LR)
    momentum: float = setting(0.0, "SGD momentum.", check=between(0, 1, top_open=True))
    weight_decay: float = setting(0.0, "SGD weight decay.", check=at_least(0, "a finite number >= 0"))
    batch_size: int = setting(256, "Training batch size.", check=at_least(1))
    width: int = setting(128, "ConvNet width (channels).", check=at_least(1))
    depth: int = setting(0, "ConvNet depth (0: 3 up to 64 px — the MCT authors' Tiny ImageNet setting; MTT used "
                         "--depth 4 there — 5 above, and 2 for 6–11 px, whose maps a third block would "
                         "shrink to 2×2; a buffer keeps the depth of the experts it holds).", check=at_least(0, ">= 1 (0 = by image size)"))
    norm: str = "instancenorm"
    zca: bool = setting(True, "ZCA whitening (Table A) or mean/std normalisation.", flags=("--zca/--no-zca",))
    zca_eps: float = setting(0.1, "ZCA epsilon (kornia's ZCAWhitening eps; the reference's 0.1).", check=above(0))
    augment: str = setting(DEFAULT_STRATEGY, "DSA ops joined by '_', or 'none'.", check=AUGMENT)
    seed: int = setting(0, "Run seed (0 … 2**63-1); expert i uses a seed spawned from (seed, i).", check=SEED)
    # --convexify: waypoints and beta computed while training, no full trajectory stored.
    convexify: bool = setting(False, "Stream: compute waypoints + beta while training and never store the full "
                              "trajectory (positions must be known up front: --interior/--positions).")
    interior: int | None = setting(None, "With --convexify: interior waypoints, uniformly placed (default 2).",
                                   check=at_least(0))
    positions: str | None = setting(None, "With --convexify: explicit positions, e.g. 0,17,34,50.")
    beta: str | None = setting(None, "With --convexify: mct (default), uniform, decreasing or projected.",
                               check=BETA)
    smooth: bool = setting(False, "With --convexify: the authors' code's waypoint smoothing.")

    def validate(self) -> None:
        """Refuse settings that cannot train (one line, exit 2): each setting's own check is declared
        with it, then the relations between settings. Needs no data, so callers check before any
        download or file; a depth too large for the images is refused when the model is built."""
        found = first_problem(self)
        if found is not None:
            raise UsageError(found.message("{option} must be {words}, got {value}"))
        if not self.convexify and (self.interior is not None or self.positions is not None or self.beta is not None
                                   or self.smooth):
            raise UsageError("--interior, --positions, --beta and --smooth only apply with --convexify "
                             "(or run `mctool convexify` on the buffer afterwards)")
        self.stream_positions()  # --positions against --epochs

    @property
    def stream_strategy(self) -> str:
        """The β strategy of a streaming buffer."""
        return self.beta or "mct"

    def stream_positions(self) -> tuple[int, ...] | None:
        """Waypoint positions of a streaming (`--convexify`) buffer, else None (settings checked by
        `validate`)."""
        if not self.convexify:
            return None
        from mctool.convexify.trajectory import parse_positions, uniform_positions

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
