"""Names the settings accept, defined without torch so that the command line can declare its
options (and answer `--help`) before torch is imported. The modules that implement them
(augment, matching, secondorder, trajectory) import them from here."""

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # DSA ops of the evaluation protocol (augment.py)
MODES = ("constant", "adjoint", "unrolled")  # --grad: how the matching loss is differentiated (matching.py)
POLICIES = ("auto", "fastgrad", "autograd")  # --second-order (secondorder.py)
STRATEGIES = ("mct", "uniform", "decreasing", "projected")  # --beta: step sizes between waypoints (trajectory.py)
