"""The settings of `mctool evaluate` (the evaluation protocol); no torch."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mctool.configs.choices import DEFAULT_STRATEGY
from mctool.configs.experts import LR, SEED
from mctool.core.errors import UsageError
from mctool.core.settings import Check, at_least, first_problem, one_of, setting

if TYPE_CHECKING:
    from mctool.training.train import Schedule


@dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation protocol: SGD(lr, momentum 0.9, wd 5e-4), lr × 0.1 at the midpoint, DSA."""

    models: tuple[str, ...] = setting(("ConvNet",), "Comma-separated: ConvNet, ConvNetBN, ResNet18, ResNet18BN, "
                                      "VGG11, VGG11BN, AlexNet, LeNet, MLP, ...",
                                      check=Check(lambda v: len(v) > 0, "a model", "{option} names no model"))
    runs: int = setting(5, "Fresh networks per model.", check=at_least(1))
    epochs: int = setting(1000, "Training epochs per network (lr x 0.1 at the midpoint).", check=at_least(0))
    lr: float | None = setting(None, "Training lr (default: the synset's learned step size).", check=LR)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    augment: str = DEFAULT_STRATEGY
    together: bool | None = setting(None, "Train a model's runs together (stacked networks; the same results as one "
                                    "after another up to float rounding). Default: on GPUs only, where it is faster.",
                                    flags=("--together/--no-together",))
    seed: int = setting(0, "Seed for network inits, shuffles, augmentation, baseline images (0 … 2**63-1).",
                        check=SEED)
    baseline_labels: str = setting("auto", "Labels of the random-real baseline (--baseline random): hard, expert (the "
                                   "synset's buffer's first expert labels them by the rule learned labels start "
                                   "from: soft, like with like), or auto: expert for a soft-label synset given its "
                                   "--buffer (without: hard, with a note), hard for a hard-label one (hard with "
                                   "--labels hard).",
                                   check=one_of("auto", "hard", "expert", words="auto, hard or expert",
                                                message="{option} must be {words}, got '{value}'"))
    baseline_draws: str = setting("per-run", "Random real images of the baseline (--baseline random): per-run: each "
                                  "of the --runs networks trains on its own random draw (run r's draw), so random "
                                  "real's ± includes which images were drawn (on GPUs the runs then train one after "
                                  "another, not stacked); one: all train on one draw (earlier releases).",
                                  check=one_of("per-run", "one", words="per-run or one",
                                               message="{option} must be {words}, got '{value}'"))
    labels: str = setting("auto", "Labels the networks train on: auto (the synset's own: soft for a soft-label synset) "
                          "or hard (the class of each image, the images being stored class by class: the hard-label "
                          "score of a label-learning synset, apart from its soft one; HLR is then defined).",
                          check=one_of("auto", "hard", words="auto or hard",
                                       message="{option} must be {words}, got '{value}'"))

    def schedule(self, lr: float) -> Schedule:
        """One run's SGD schedule (building it checks the values: one usage line if bad)."""
        from mctool.training.train import Schedule

        return Schedule(epochs=self.epochs, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay,
                        batch_size=self.batch_size, decay_epoch=self.epochs // 2)

    def validate(self) -> None:
        """Refuse settings that cannot run, before any data is prepared: each setting's check is
        declared with it; the schedule checks the protocol's fixed fields (no options)."""
        found = first_problem(self)
        if found is not None:
            raise UsageError(found.message("{option} must be {words}, got {value}"))
        self.schedule(self.lr if self.lr is not None else 0.01)


def draw_count(config: object, runs: object) -> int:
    """How many random draws of real images a random-real evaluation with `config` (its stored
    protocol) and `runs` networks trained on: one per run with baseline_draws per-run, else one
    (records from earlier releases lack the setting: one draw). Read from files: anything
    else than a mapping and a positive int counts as one draw."""
    per_run = isinstance(config, Mapping) and config.get("baseline_draws") == "per-run"
    return runs if per_run and isinstance(runs, int) and not isinstance(runs, bool) and runs > 1 else 1
