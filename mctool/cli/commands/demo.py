"""`mctool demo`: see the whole method work on real data in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mctool.cli.common import DataDirOpt, DebugOpt, DeviceOpt, JsonOpt, QuietOpt, emit_json, run
from mctool.cli.render import mean_std, stdout, table

EPILOG = ("Examples:\n\n  mctool demo\n\n  mctool demo --fast -o /tmp/demo\n\n"
          "Needs Fashion-MNIST: `apt-get install dataset-fashion-mnist`, or the IDX files in DATA_DIR/fashion-mnist/.")


def demo(
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Folder for the demo's artifacts and pictures (default: mctool-demo, or mctool-demo-fast with --fast)."),
    fast: bool = typer.Option(False, "--fast", help="A smaller run: 1–4 minutes on 2 CPU cores (the full demo: 4–8 min)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every stage (0 … 2**63-1)."),
    data_dir: Optional[Path] = DataDirOpt,
    device: str = DeviceOpt,
    json_out: bool = JsonOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Run experts -> convexify -> distill -> evaluate on real Fashion-MNIST and compare with random real images."""

    def body(reporter):
        from mctool.demo import DemoConfig, run as run_demo
        from mctool.experts import check_seed

        check_seed(seed)
        cfg = DemoConfig.fast(seed) if fast else DemoConfig(seed=seed)
        folder = out or Path("mctool-demo-fast" if fast else "mctool-demo")
        r = run_demo(cfg, folder, data_dir, device, reporter)
        if json_out:
            emit_json(r)
            return
        d, b = r.distilled, r.random_real
        st, s = r.storage, r.seconds
        rows = [
            [f"distilled (MCT, ipc {r.ipc})", mean_std(d.mean, d.std, d.runs), f"{d.runs} runs x {d.epochs} epochs"],
            [f"random real (ipc {r.ipc})", mean_std(b.mean, b.std, b.runs), "same protocol"],
            ["experts (whole dataset)", f"{100 * r.experts_accuracy:.2f}",
             f"{cfg.experts} expert(s) x {cfg.epochs} epochs, width {cfg.width}"],
            ["storage per expert", f"{st['full_bytes_per_expert'] / 1e6:.2f} MB -> {st['convex_bytes_per_expert'] / 1e6:.2f} MB",
             f"full vs convexified: {st['ratio']:.2f}x smaller"],
            ["time per stage", f"{sum(s.values()):.0f} s",
             ", ".join(f"{k} {v:.0f} s" for k, v in s.items())
             + (f" ({r.experts_reused} expert(s) reused from an earlier run)" if r.experts_reused else "")],
        ]
        stdout.print(table("mctool demo: Fashion-MNIST", ["", "test accuracy % / value", "notes"], rows))
        verdict = "beats" if d.mean > b.mean else "does NOT beat"
        stdout.print(f"The distilled set {verdict} random real images on the same protocol. "
                     f"Images: {r.png}; artifacts in {r.out}/ (try `mctool inspect {r.files['convex']}`).")

    run(body, quiet, debug, interrupt_hint="finished experts are kept; run the demo again to continue")
