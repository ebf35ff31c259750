"""Every command's settings (config dataclasses whose fields declare the options, mctool/core/settings.py),
importable without torch: the command line builds its options and answers `--help`, `--version`
and usage errors from them before torch is imported. The library modules (experts, convex,
distill, evaluate) re-export their config class, so `from mctool.distill import DistillConfig`
keeps working."""
