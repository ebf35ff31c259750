"""mctool: dataset distillation by Matching Convexified Trajectory (MCT)."""

__version__ = "0.2.0"
