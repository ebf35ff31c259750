"""Every variant of the MCT authors' compressed experts imports to a /convex that distill reads,
and θ̂(c) there is the authors' get_point_n, re-derived independently in float64 (issue 24 item 9).

The variants: ip2 (raw [θ_0, θ_K]), ip3 and ip4 (smoothed waypoints), each with a layer that never
moves (the first convolution's bias, whose gradient is zero before instance norm: the authors give
it β ≡ 0), and the ablations uniform, decreasing (β(0) ≠ 0) and projected (one β for all layers).
"""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mctool import store
from mctool.interop.compressed import to_convex
from mctool.interop.importer import ImportConfig, import_compressed, plan_compressed, resolve_source
from mctool.interop.torchfile import TorchFileError
from mctool.models import build_model, param_layout
from mctool.store.convex import read_convex, read_convex_expert
from mctool.convexify.trajectory import ConvexTrajectory
from tests.conftest import cli
from tests.interop_fixtures import (
    authors_point, make_experts, tiny_spec, write_ablation_pair, write_authors_pair,
)

K = 6
FROZEN = 1  # conv1's bias


@pytest.fixture(scope="module")
def prepared(data_dir: Path):
    from mctool.data.prepared import prepare

    return prepare("mnist", data_dir, False, 0.1, torch.device("cpu"))


def _experts(seed: int, frozen: int | None = FROZEN, n: int = 2) -> list:
    experts = make_experts(tiny_spec(), n, K, seed=seed)
    if frozen is not None:
        for e in experts:
            for snap in e[1:]:
                snap[frozen] = e[0][frozen].clone()
    return experts


def _write(folder: Path, variant: str, experts: list) -> tuple[Path, Path]:
    if variant.startswith("ip"):
        return write_authors_pair(folder, 0, experts, int(variant[2:]))
    return write_ablation_pair(folder, 0, experts, variant)


def _import(folder: Path, out: Path, prepared) -> None:
    cfg = ImportConfig(dataset="mnist", zca=False, accuracy="none")
    plan = plan_compressed(folder, cfg, resolve_source(folder, cfg), prepared.meta)
    import_compressed(plan, out, cfg, prepared)


VARIANTS = ["ip2", "ip3", "ip4", "uni", "dec", "proj"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_reconstructs_the_authors_points(tmp_path: Path, prepared, variant: str) -> None:
    experts = _experts(seed=21)
    wfile, sfile = _write(tmp_path / variant, variant, experts)
    if variant in ("ip2", "ip3", "ip4"):  # the frozen layer's stored fractions are all 0
        steps = torch.load(sfile)[0]
        values = [p[FROZEN] for seg in (steps if isinstance(steps[0][0], list) else [steps]) for p in seg]
        assert all(float(v) == 0.0 for v in values)
    out = tmp_path / "c.h5"
    _import(tmp_path / variant, out, prepared)
    layout = param_layout(build_model(tiny_spec()))
    sizes = [math.prod(s) for _, s in layout]
    with h5py.File(out) as f:
        meta = store.read_convex_meta(out, f)
        info = read_convex(out, f, layout, K)
        for e in range(len(experts)):
            # The store's own check (the one distill and inspect run) accepts every row.
            waypoints, beta = read_convex_expert(out, f, info, e)
            traj = ConvexTrajectory(waypoints, beta, list(meta.positions), sizes)
            for c in np.linspace(0, K, 4 * K + 1):
                want = torch.cat([t.reshape(-1) for t in authors_point(wfile, sfile, e, float(c))])
                got = traj.at(float(c)).double()
                scale = max(1.0, float(want.abs().max()))
                # float32 waypoints and β against float64: a few float32 ulps of the values.
                assert float((got - want).abs().max()) <= 4e-7 * scale, (variant, e, c)
            if variant in ("ip2", "ip3", "ip4", "uni", "proj"):  # waypoints kept bit for bit
                stored = torch.load(wfile)[e]
                for j, w in enumerate(stored):
                    assert torch.equal(waypoints[j], torch.cat([t.reshape(-1) for t in w]))


def test_a_file_of_every_variant_is_read_by_inspect_and_distill(tmp_path: Path, prepared, data_dir: Path) -> None:
    from tests.test_interop_import import TINY_DISTILL

    for variant in ("ip4", "dec"):
        _write(tmp_path / variant, variant, _experts(seed=22))
        out = tmp_path / f"{variant}.h5"
        _import(tmp_path / variant, out, prepared)
        r = cli("inspect", out)
        assert r.exit_code == 0, r.output
        r = cli("distill", "--buffer", out, "-o", tmp_path / f"syn-{variant}.h5", "--data-dir", data_dir,
                *TINY_DISTILL)
        assert r.exit_code == 0, r.output


def test_decreasing_moves_the_first_waypoint_to_the_authors_start() -> None:
    """β(0) = 0.4 (K = 3): W'_0 = lerp(W_0, W_1, 0.4), β' = (β − 0.4) / 0.6, in float64 by hand."""
    w = torch.tensor([[0.0, 10.0], [1.0, 20.0]])
    s = torch.tensor([[0.4, 0.4], [0.7, 0.7], [0.9, 0.9], [1.0, 1.0]], dtype=torch.float64)
    out, beta = to_convex(w, [s], [1, 1], "x")
    assert out[0].tolist() == pytest.approx([0.4, 14.0]) and torch.equal(out[1], w[1])
    assert beta[:, 0].tolist() == pytest.approx([0.0, 0.5, 5 / 6, 1.0])


def test_a_frozen_layer_gets_the_uniform_ramp_and_other_layers_keep_theirs() -> None:
    w = torch.tensor([[0.0, 5.0], [1.0, 5.0], [3.0, 5.0]])
    s0 = torch.tensor([[0.0, 0.0], [0.25, 0.0], [1.0, 0.0]], dtype=torch.float64)
    s1 = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    out, beta = to_convex(w, [s0, s1], [1, 1], "x")
    assert torch.equal(out, w)
    assert beta.tolist() == [[0.0, 0.0], [0.25, 0.5], [1.0, 1.0], [2.0, 2.0]]


def test_what_no_beta_can_follow_is_refused_with_one_line(tmp_path: Path, prepared) -> None:
    # A layer that stops moving part-way: its smoothed waypoints differ across a segment the authors
    # give β ≡ 0 — their θ jumps at the next waypoint.
    experts = _experts(seed=23, frozen=None, n=1)
    for snap in experts[0][4:]:
        snap[FROZEN] = experts[0][3][FROZEN].clone()
    folder = tmp_path / "stops"
    write_authors_pair(folder, 0, experts, 3)
    with pytest.raises(TorchFileError, match="does not move in segment 1 but its waypoints 1 and 2 differ") as info:
        _import(folder, tmp_path / "a.h5", prepared)
    assert "\n" not in str(info.value) and not (tmp_path / "a.h5").exists()
    # A projected β beyond θ_K part-way (the trajectory overshoots and comes back).
    experts = _experts(seed=24, frozen=None, n=1)
    experts[0][3] = [2 * b - a for a, b in zip(experts[0][0], experts[0][-1])]
    folder = tmp_path / "over"
    write_ablation_pair(folder, 0, experts, "proj")
    with pytest.raises(TorchFileError, match=r"a step value 2 outside \[0, 1\]"):
        _import(folder, tmp_path / "b.h5", prepared)
    assert not (tmp_path / "b.h5").exists()
