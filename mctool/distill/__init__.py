"""MCT distillation: learn synthetic images by matching convexified expert trajectories.

The package, by job:

- config: DistillConfig (every setting, with its check), presets, what a buffer implies, resume rules;
- learnables: what is learned (images, α), as data: update settings, bounds, stored names;
- state: the run's State (the learnables' values and momentum, generators, queues, history);
- loop: the experts, one iteration (positions, batches, augmentation, the match) and the update;
- checkpoint: State <-> the stored synset and its checkpoint;
- runner: a whole run (data, loop, checkpoints, periodic evaluations, pictures);
- dryrun: `--dry-run`'s memory estimate;
- autoconfig: settings for a buffer no preset was made for; tune: `--tune`'s search (tune_plan: what fits
  the budget; tune_preset: the preset file it writes).

`from mctool.distill import X` gives the names other modules use; the submodules hold the rest.
"""

# Each public name -> the submodule that defines it. Loaded on first use (PEP 562), so that a
# torch-free submodule (autoconfig, read by `--list-presets`) imports without torch.
_WHERE = {
    "stored_config": "checkpoint",
    **dict.fromkeys(("DistillConfig", "buffer_defaults", "buffer_note", "check_buffer_matches", "check_synset_name",
                     "list_presets", "load_preset", "missing_buffer_hint", "preset_schema", "resolve_config",
                     "synset_name"), "config"),
    **dict.fromkeys(("DryRunReport", "DryRunRow", "dry_run"), "dryrun"),
    **dict.fromkeys(("ALPHA_BOUND", "IMAGE_BOUND", "LEARNABLES", "Learnable", "learned_in"), "learnables"),
    **dict.fromkeys(("MAX_BAD_FRACTION", "MAX_BAD_IN_A_ROW", "Distiller", "Expert", "ExpertSource",
                     "choose_micro_batch", "second_order_policy", "workload"), "loop"),
    **dict.fromkeys(("Continuation", "DistillResult", "_Run", "run", "run_prepared"), "runner"),
    **dict.fromkeys(("State", "initial_state"), "state"),
}


def __getattr__(name: str) -> object:
    """`from mctool.distill import X`: X from the submodule that defines it."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'mctool.distill' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"mctool.distill.{where}"), name)


__all__ = ["ALPHA_BOUND", "buffer_defaults", "buffer_note", "check_buffer_matches", "check_synset_name",
           "choose_micro_batch", "Continuation", "DistillConfig", "Distiller", "DistillResult", "dry_run", "DryRunReport",
           "DryRunRow", "Expert", "ExpertSource", "IMAGE_BOUND", "initial_state", "Learnable", "LEARNABLES",
           "learned_in", "list_presets", "load_preset", "MAX_BAD_FRACTION", "MAX_BAD_IN_A_ROW", "missing_buffer_hint",
           "preset_schema", "resolve_config", "_Run", "run", "run_prepared", "second_order_policy", "State",
           "stored_config", "synset_name", "workload"]
