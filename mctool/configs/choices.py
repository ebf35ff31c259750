"""Names the settings accept, defined without torch so that the command line can declare its
options (and answer `--help`) before torch is imported. The modules that implement them
(augment, matching, secondorder, trajectory) import them from here."""

from __future__ import annotations

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")  # the DSA ops a strategy joins with '_' (augment.py)
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # DSA ops of the evaluation protocol (augment.py)
MODES = ("constant", "adjoint", "unrolled")  # --grad: how the matching loss is differentiated (matching.py)
POLICIES = ("auto", "fastgrad", "autograd")  # --second-order (secondorder.py)
STRATEGIES = ("mct", "uniform", "decreasing", "projected")  # --beta: step sizes between waypoints (trajectory.py)


def augment_problem(strategy: str) -> str | None:
    """Why `strategy` is no DSA strategy (its first unknown op), or None when it is one."""
    if strategy.lower() == "none":
        return None
    unknown = [o for o in strategy.split("_") if o not in OPS]
    if not unknown:
        return None
    return (f"unknown augmentation op {unknown[0]!r} in strategy {strategy!r}; "
            f"known ops: {', '.join(OPS)} (joined by '_'), or 'none'")
