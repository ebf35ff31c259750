"""The scores the field compares synthetic sets by, next to mean ± std test accuracy.

* **Gain over random real** (DD-Ranking's "improvement over random", IOR): accuracy of networks
  trained on the synthetic set minus accuracy of networks trained on ipc random real training
  images per class, under the same evaluation protocol. mctool's evaluation gives run r of both
  sets the same seed (same network initialisation, shuffles and augmentation draws), so the
  gain is computed per run and reported as the mean and population std of the paired
  differences, as DD-Ranking does over its evaluation runs.
* **Hard-label recovery** (DD-Ranking's HLR): accuracy of networks trained on the whole real
  training set with hard labels minus accuracy of networks trained on the synthetic set with
  hard labels; lower is better, 0 means the synthetic set recovers the whole dataset. The
  whole-data accuracy is a constant here (the experts' final test accuracy stored with the
  buffer, or a value the user passes), so per run HLR_r = whole − syn_r: mean whole − mean(syn),
  std = std(syn). Defined for hard labels only; a soft-label synset gets no HLR.

Sources: DD-Ranking (Li, Zhong et al., "DD-Ranking: Rethinking the Evaluation of Dataset
Distillation", arXiv:2505.13300; README and ``ddranking/metrics/hard_label.py`` of
github.com/NUS-HPC-AI-Lab/DD-Ranking): HLR = Acc(real, hard) − Acc(syn, hard),
IOR = Acc(syn, any) − Acc(random, any), each per evaluation run, reported as mean and std.

Differences from DD-Ranking's own numbers, which the report states: DD-Ranking trains its
whole-data reference under its own recipe, while the experts' accuracy comes from the experts'
training (e.g. 50 epochs of plain SGD with DSA); DD-Ranking searches the random subset's learning
rate, while mctool trains it with the synthetic set's (same protocol for both); and for a
soft-label synset DD-Ranking gives the random images teacher soft labels, which mctool's random
baseline does with `--baseline-labels expert` (the synset's expert, DATM's rule: mctool.training.labels);
otherwise it uses their hard labels and the score says the comparison is not like with like.

Accuracies are fractions in [0, 1] throughout (the CLI prints percentage points).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from mctool.core.errors import UsageError


def paired_gain(synset: Sequence[float], random: Sequence[float]) -> tuple[float, float | None, bool]:
    """(mean, std, paired): per-run differences when both have the same runs, else means only (std None)."""
    if not synset or not random:
        raise ValueError("both sets need at least one accuracy")
    if len(synset) == len(random):
        diffs = [s - r for s, r in zip(synset, random)]
        return statistics.fmean(diffs), statistics.pstdev(diffs), True
    return statistics.fmean(synset) - statistics.fmean(random), None, False


def hard_label_recovery(whole: float, synset: Sequence[float]) -> tuple[float, float]:
    """(mean, std) of HLR_r = whole − synset_r over the runs."""
    if not synset:
        raise ValueError("need at least one synset accuracy")
    per_run = [whole - s for s in synset]
    return statistics.fmean(per_run), statistics.pstdev(per_run)


def whole_data_accuracy(reference: dict[str, Any] | None, override: float | None) -> tuple[float | None, str]:
    """The whole-data accuracy to use and where it comes from ('option', 'experts', or 'unknown')."""
    if override is not None:
        if not 0.0 <= override <= 1.0:
            # Accept percentages too: 71.3 means 0.713.
            if 1.0 < override <= 100.0:
                return override / 100.0, "option"
            raise UsageError(f"--whole-data must be an accuracy: a fraction (0.91) or a percentage (91), got {override}")
        return float(override), "option"
    if reference is not None:
        mean = reference.get("mean")
        if mean is not None and not math.isnan(float(mean)):
            return float(mean), "experts"
    return None, "unknown"


def score_text(mean: float, std: float | None, runs: int) -> str:
    """'74.10 ± 0.52 (n = 2)' in percent; one run has no spread: '74.10 (n = 1)'."""
    if runs <= 1 or std is None:
        return f"{100 * mean:.2f} (n = {runs})"
    return f"{100 * mean:.2f} ± {100 * std:.2f} (n = {runs})"
