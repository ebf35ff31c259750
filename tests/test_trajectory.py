"""Tests for mctool.convexify.trajectory: β strategies, smoothing, reconstruction, streaming."""

from __future__ import annotations

import math

import pytest
import torch

from mctool.core.errors import UsageError
from mctool.convexify.trajectory import (
    STRATEGIES,
    ConvexTrajectory,
    StreamingConvexifier,
    convexify,
    parse_positions,
    segment_beta,
    uniform_positions,
)

# ---------------------------------------------------------------------------------------------
# A tiny hand-checkable trajectory: 2 layers of sizes [2, 1] (P = 3), K = 4.
#   layer 0 = entries 0..1, layer 1 = entry 2
SIZES = [2, 1]
TINY = torch.tensor(
    [
        [0.0, 0.0, 0.0],  # θ_0
        [3.0, 4.0, 1.0],  # θ_1   step 0: layer0 |(3,4)| = 5,  layer1 |1| = 1
        [3.0, 4.0, 3.0],  # θ_2   step 1: layer0 0,            layer1 |2| = 2
        [6.0, 8.0, 3.0],  # θ_3   step 2: layer0 |(3,4)| = 5,  layer1 0
        [11.0, 20.0, 3.0],  # θ_4 step 3: layer0 |(5,12)| = 13, layer1 0
    ]
)
TINY_POS = [0, 2, 4]

# mct, segment 0 = [0, 2]: layer0 steps 5, 0 (total 5)  -> s = 0, 5/5, 5/5 = 0, 1, 1
#                          layer1 steps 1, 2 (total 3)  -> s = 0, 1/3, 3/3
#      segment 1 = [2, 4]: layer0 steps 5, 13 (total 18) -> s = 0, 5/18, 1
#                          layer1 steps 0, 0 (total 0)   -> degenerate: s = k/n = 0, 1/2, 1
# global β = segment index + s
MCT_BETA = [
    [0.0, 0.0],
    [1.0, 1 / 3],
    [1.0, 1.0],
    [1 + 5 / 18, 1.5],
    [2.0, 2.0],
]
# uniform: n = 2 per segment -> s = 0, 1/2, 1
UNIFORM_BETA = [[0.0] * 2, [0.5] * 2, [1.0] * 2, [1.5] * 2, [2.0] * 2]
# decreasing: n = 2 -> increments 2, 1 over a total of 3 -> s = 0, 2/3, 3/3
DECREASING_BETA = [[0.0] * 2, [2 / 3] * 2, [1.0] * 2, [1 + 2 / 3] * 2, [2.0] * 2]
# projected, segment 0: v = θ_2 - θ_0 = (3,4,3), |v|² = 9+16+9 = 34
#                       θ_1 - θ_0 = (3,4,1): <.,v> = 9+16+3 = 28 -> 28/34 = 14/17
#            segment 1: v = θ_4 - θ_2 = (8,16,0), |v|² = 64+256 = 320
#                       θ_3 - θ_2 = (3,4,0): <.,v> = 24+64 = 88 -> 88/320 = 0.275
PROJECTED_BETA = [[0.0] * 2, [14 / 17] * 2, [1.0] * 2, [1.275] * 2, [2.0] * 2]

HAND_BETA = {
    "mct": MCT_BETA,
    "uniform": UNIFORM_BETA,
    "decreasing": DECREASING_BETA,
    "projected": PROJECTED_BETA,
}


def random_trajectory(K: int = 10, P: int = 50, seed: int = 0) -> torch.Tensor:
    """A random-walk trajectory [K+1, P] (float32) with uneven step sizes."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(K, P, generator=g) * torch.rand(K, 1, generator=g)
    start = torch.randn(1, P, generator=g)
    return torch.cat([start, start + steps.cumsum(0)]).float()


RAND_SIZES = [20, 5, 15, 10]  # P = 50, uneven layers
RAND_POS = [0, 3, 7, 10]


# ---------------------------------------------------------------------------------------------
# Independent reference: Algorithm A written straight from the seed pseudocode with loops in
# float64. (The printed loop runs j = p_{i-1}+1..p_i with θ_{j+1} - θ_j, which overruns the
# segment by one; the intended cumulative length from the segment start is used here.)


def reference_points(traj: torch.Tensor, sizes: list[int], positions: list[int]) -> list[list[float]]:
    """The convexified point θ_{p_i} + s_l(k)(θ_{p_{i+1}} - θ_{p_i}) at every integer k."""
    rows = [[float(v) for v in r] for r in traj.double()]
    bounds = []
    start = 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    K = positions[-1]
    out: list[list[float] | None] = [None] * (K + 1)
    for i in range(1, len(positions)):
        a, b = positions[i - 1], positions[i]
        n = b - a
        for k in range(a, b + 1):
            point = []
            for lo, hi in bounds:
                betas = [0.0]  # β^(p_{i-1}) = 0
                for j in range(a, b):
                    norm = math.sqrt(sum((rows[j + 1][e] - rows[j][e]) ** 2 for e in range(lo, hi)))
                    betas.append(betas[-1] + norm)
                total = betas[-1]
                s = betas[k - a] / total if total > 0 else (k - a) / n
                for e in range(lo, hi):
                    point.append(rows[a][e] + s * (rows[b][e] - rows[a][e]))
            out[k] = point
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Hand-computed β


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_hand_computed_beta(strategy: str, device: torch.device) -> None:
    waypoints, beta = convexify(TINY.to(device), SIZES, TINY_POS, strategy)
    assert beta.device == waypoints.device == TINY.to(device).device
    waypoints, beta = waypoints.cpu(), beta.cpu()
    assert beta.dtype == torch.float32 and waypoints.dtype == torch.float32
    assert beta.shape == (5, 2) and waypoints.shape == (3, 3)
    torch.testing.assert_close(beta, torch.tensor(HAND_BETA[strategy]), rtol=0, atol=1e-7)
    assert torch.equal(waypoints, TINY[TINY_POS])


def test_segment_beta_hand(device: torch.device) -> None:
    tiny = TINY.to(device)
    # Segment 1 of TINY alone, mct: layer0 0, 5/18, 1; layer1 degenerate 0, 1/2, 1.
    s = segment_beta(tiny[2:5], SIZES, "mct").cpu()
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, torch.tensor([[0, 0], [5 / 18, 0.5], [1, 1]], dtype=torch.float64))
    # decreasing, n = 4: increments 4,3,2,1 over 10 -> 0, .4, .7, .9, 1
    s = segment_beta(tiny, SIZES, "decreasing").cpu()
    torch.testing.assert_close(s[:, 0], torch.tensor([0, 0.4, 0.7, 0.9, 1], dtype=torch.float64))
    # n = 1: every strategy gives exactly [0, 1]
    for strategy in STRATEGIES:
        assert segment_beta(tiny[:2], SIZES, strategy).tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_projected_clamps_and_degenerate(device: torch.device) -> None:
    # Overshoot: v = (2,0,0), |v|² = 4; θ_1 - θ_0 = (4,0,0) -> 8/4 = 2 -> clamped to 1.
    over = torch.tensor([[0.0, 0, 0], [4, 0, 0], [2, 0, 0]], device=device)
    assert segment_beta(over, SIZES, "projected")[:, 0].tolist() == [0.0, 1.0, 1.0]
    # Going backwards: θ_1 - θ_0 = (-2,0,0) -> -4/4 = -1 -> clamped to 0.
    back = torch.tensor([[0.0, 0, 0], [-2, 0, 0], [2, 0, 0]], device=device)
    assert segment_beta(back, SIZES, "projected")[:, 0].tolist() == [0.0, 0.0, 1.0]
    # θ_b == θ_a: no direction -> k/n = 0, 1/2, 1 (not 0/0).
    loop = torch.tensor([[1.0, 2, 3], [5, 5, 5], [1, 2, 3]], device=device)
    assert segment_beta(loop, SIZES, "projected")[:, 1].tolist() == [0.0, 0.5, 1.0]


def test_mct_degenerate_layer_is_uniform(device: torch.device) -> None:
    still = torch.zeros(4, 3, device=device)
    s = segment_beta(still, SIZES, "mct").cpu()
    assert not torch.isnan(s).any()
    torch.testing.assert_close(s[:, 0], torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64))


def test_unknown_strategy() -> None:
    with pytest.raises(UsageError):
        convexify(TINY, SIZES, TINY_POS, "fancy")
    with pytest.raises(UsageError):
        segment_beta(TINY, SIZES, "fancy")


# ---------------------------------------------------------------------------------------------
# Properties on random trajectories


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("positions", [RAND_POS, [0, 10], [0, 1, 2, 9, 10]])
def test_beta_properties(strategy: str, positions: list[int], device: torch.device) -> None:
    traj = random_trajectory().to(device)
    _, beta = convexify(traj, RAND_SIZES, positions, strategy)
    for i, p in enumerate(positions):
        assert (beta[p] == i).all(), "β must be exactly i at p_i"
    for i, (a, b) in enumerate(zip(positions, positions[1:])):
        s = beta[a : b + 1] - i
        assert (s >= 0).all() and (s <= 1).all()
        if strategy != "projected":
            assert (s[1:] >= s[:-1]).all(), "monotone"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_at_waypoints_exact(strategy: str, device: torch.device) -> None:
    traj = random_trajectory().to(device)
    w, beta = convexify(traj, RAND_SIZES, RAND_POS, strategy)
    ct = ConvexTrajectory(w, beta, RAND_POS, RAND_SIZES)
    assert ct.K == 10 and ct.num_waypoints == 4
    for i, p in enumerate(RAND_POS):
        assert torch.equal(ct.at(p), w[i])
        assert torch.equal(ct.at(float(p)), traj[p])  # not smoothed: the raw snapshot


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_at_continuous_and_linear(strategy: str, device: torch.device) -> None:
    traj = random_trajectory().to(device)
    w, beta = convexify(traj, RAND_SIZES, RAND_POS, strategy, smooth=True)
    ct = ConvexTrajectory(w, beta, RAND_POS, RAND_SIZES)
    for i, p in enumerate(RAND_POS):
        for c in (p - 1e-6, p + 1e-6):
            if 0 <= c <= ct.K:
                torch.testing.assert_close(ct.at(c), w[i], rtol=0, atol=1e-4)
    for k in range(ct.K):
        lo, hi = ct.at(k).double(), ct.at(k + 1).double()
        for t in (0.25, 0.5, 0.75):
            expected = (1 - t) * lo + t * hi
            torch.testing.assert_close(ct.at(k + t).double(), expected, rtol=0, atol=1e-5)


def test_at_matches_reference_algorithm_a(device: torch.device) -> None:
    traj = random_trajectory(seed=3)
    w, beta = convexify(traj.to(device), RAND_SIZES, RAND_POS, "mct")
    ct = ConvexTrajectory(w, beta, RAND_POS, RAND_SIZES)
    ref = reference_points(traj, RAND_SIZES, RAND_POS)
    for k in range(ct.K + 1):
        torch.testing.assert_close(
            ct.at(k).double().cpu(), torch.tensor(ref[k], dtype=torch.float64), rtol=1e-5, atol=1e-5
        )


def test_at_hand_values(device: torch.device) -> None:
    w, beta = convexify(TINY, SIZES, TINY_POS, "mct")
    ct = ConvexTrajectory(w, beta, TINY_POS, SIZES).to(device)
    assert ct.at(1).device == ct.waypoints.device == beta.to(device).device
    ct = ct.to("cpu")
    # c = 1: segment 0 (W_0 = 0, W_1 = θ_2 = (3,4,3)); b = (1, 1/3) -> (3, 4, 1)
    torch.testing.assert_close(ct.at(1), torch.tensor([3.0, 4.0, 1.0]))
    # c = 3.5: segment 1 (W_1 = (3,4,3), W_2 = (11,20,3)), layer0 b = lerp(5/18, 1, .5) = 23/36
    #   -> (3 + 8·23/36, 4 + 16·23/36, 3) ; layer1 constant 3
    torch.testing.assert_close(
        ct.at(3.5), torch.tensor([3 + 8 * 23 / 36, 4 + 16 * 23 / 36, 3.0])
    )
    # tensor position and the tolerance just outside [0, K]
    assert torch.equal(ct.at(torch.tensor(2.0)), TINY[2])
    assert torch.equal(ct.at(-1e-12), TINY[0])
    assert torch.equal(ct.at(4 + 1e-12), TINY[4])


@pytest.mark.parametrize("c", [-0.1, 4.1, float("nan"), float("inf")])
def test_at_out_of_range(c: float) -> None:
    w, beta = convexify(TINY, SIZES, TINY_POS)
    with pytest.raises(ValueError):
        ConvexTrajectory(w, beta, TINY_POS, SIZES).at(c)


def test_convex_trajectory_validation_and_to() -> None:
    w, beta = convexify(TINY, SIZES, TINY_POS)
    with pytest.raises(ValueError):
        ConvexTrajectory(w[:2], beta, TINY_POS, SIZES)
    with pytest.raises(ValueError):
        ConvexTrajectory(w, beta[:4], TINY_POS, SIZES)
    with pytest.raises(ValueError):
        ConvexTrajectory(w, beta, TINY_POS, [1, 1])
    ct = ConvexTrajectory(w, beta, TINY_POS, SIZES).to("cpu")
    assert torch.equal(ct.at(2.5), ConvexTrajectory(w, beta, TINY_POS, SIZES).at(2.5))


# ---------------------------------------------------------------------------------------------
# Smoothing (authors' §5.3)


def test_smoothing_hand_example(device: torch.device) -> None:
    # positions [0, 2, 3, 4]: 2 and 3 are consecutive interior waypoints, 3 = K-1.
    # smoothed θ_2 = (θ_1 + θ_3)/2            = ((3+6)/2, (4+8)/2, (1+3)/2)     = (4.5, 6, 2)
    # smoothed θ_3 = (smoothed θ_2 + θ_4)/2   = ((4.5+11)/2, (6+20)/2, (2+3)/2) = (7.75, 13, 2.5)
    # final    θ_4 = (smoothed θ_3 + θ_4)/2   = ((7.75+11)/2, (13+20)/2, (2.5+3)/2)
    #                                          = (9.375, 16.5, 2.75)
    w, beta = (t.cpu() for t in convexify(TINY.to(device), SIZES, [0, 2, 3, 4], "mct", smooth=True))
    expected = torch.tensor(
        [[0.0, 0.0, 0.0], [4.5, 6.0, 2.0], [7.75, 13.0, 2.5], [9.375, 16.5, 2.75]]
    )
    assert torch.equal(w, expected)
    # β comes from the raw snapshots: segment [0,2] as before; 1-step segments give 2, 3.
    torch.testing.assert_close(
        beta, torch.tensor([[0, 0], [1, 1 / 3], [1, 1], [2, 2], [3, 3]]), rtol=0, atol=1e-7
    )
    # positions [0, 2, 4]: θ_2 -> (θ_1 + θ_3)/2 = (4.5, 6, 2); θ_4 -> (θ_3 + θ_4)/2 = (8.5, 14, 3)
    w, beta_s = convexify(TINY, SIZES, TINY_POS, "mct", smooth=True)
    assert torch.equal(w, torch.tensor([[0.0, 0, 0], [4.5, 6, 2], [8.5, 14, 3]]))
    assert torch.equal(beta_s, convexify(TINY, SIZES, TINY_POS, "mct")[1])
    # no interior waypoints: only the final point changes
    w, _ = convexify(TINY, SIZES, [0, 4], "uniform", smooth=True)
    assert torch.equal(w, torch.tensor([[0.0, 0, 0], [8.5, 14, 3]]))


# ---------------------------------------------------------------------------------------------
# Streaming


def stream(traj: torch.Tensor, sizes: list[int], positions: list[int], strategy: str, smooth: bool):
    sc = StreamingConvexifier(sizes, positions, strategy, smooth)
    buf = torch.empty(traj.shape[1], device=traj.device)
    for row in traj:
        buf.copy_(row)  # the caller reuses its buffer: the streamer must copy
        sc.push(buf)
    return sc.result()


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("positions", [RAND_POS, [0, 10], [0, 1, 2, 9, 10], [0, 9, 10]])
def test_streaming_equals_batch(strategy: str, smooth: bool, positions: list[int], device: torch.device) -> None:
    traj = random_trajectory(seed=7).to(device)
    w_b, beta_b = convexify(traj, RAND_SIZES, positions, strategy, smooth)
    w_s, beta_s = stream(traj, RAND_SIZES, positions, strategy, smooth)
    assert w_s.device == w_b.device == traj.device
    torch.testing.assert_close(w_s, w_b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(beta_s, beta_b, rtol=1e-6, atol=1e-6)


def test_streaming_hand_smoothing() -> None:
    w, _ = stream(TINY, SIZES, [0, 2, 3, 4], "mct", smooth=True)
    assert torch.equal(
        w, torch.tensor([[0.0, 0, 0], [4.5, 6, 2], [7.75, 13, 2.5], [9.375, 16.5, 2.75]])
    )


def test_streaming_errors() -> None:
    sc = StreamingConvexifier(SIZES, TINY_POS)
    with pytest.raises(ValueError):
        sc.push(torch.zeros(4))
    sc.push(TINY[0])
    with pytest.raises(ValueError):
        sc.result()
    for row in TINY[1:]:
        sc.push(row)
    with pytest.raises(ValueError):
        sc.push(TINY[0])
    with pytest.raises(UsageError):
        StreamingConvexifier(SIZES, [0, 3, 2])


# ---------------------------------------------------------------------------------------------
# Positions


def test_uniform_positions() -> None:
    assert uniform_positions(50, 2) == [0, 17, 33, 50]
    assert uniform_positions(50, 0) == [0, 50]
    assert uniform_positions(4, 3) == [0, 1, 2, 3, 4]
    assert uniform_positions(10, 3) == [0, 3, 5, 8, 10]  # 2.5 -> 3, 7.5 -> 8 (halves up)
    for K in range(1, 30):
        for interior in range(K):
            p = uniform_positions(K, interior)
            assert p[0] == 0 and p[-1] == K and len(p) == interior + 2
            assert all(b > a for a, b in zip(p, p[1:]))


@pytest.mark.parametrize("K, interior", [(4, 4), (4, 10), (4, -1), (0, 0)])
def test_uniform_positions_errors(K: int, interior: int) -> None:
    with pytest.raises(UsageError):
        uniform_positions(K, interior)


def test_parse_positions() -> None:
    assert parse_positions("0,17,34,50", 50) == [0, 17, 34, 50]
    assert parse_positions(" 0, 25 ,50 ", 50) == [0, 25, 50]


@pytest.mark.parametrize(
    "text", ["0,34,17,50", "0,17,17,50", "1,17,50", "0,17,49", "0,17,51", "a,b", "0,,50", "", "0",
             "0,1.5,50", "50"]
)
def test_parse_positions_errors(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_positions(text, 50)
    assert "\n" not in str(err.value)


def test_parse_positions_names_every_problem() -> None:
    with pytest.raises(UsageError) as err:
        parse_positions("1,9,3", 10)
    message = str(err.value)
    for part in ("starts at 1", "9 is followed by 3", "ends at 3, not K=10"):
        assert part in message
    with pytest.raises(UsageError) as err:
        parse_positions("0,5,2", 3)
    assert "5 is outside 0..K=3" in str(err.value)
    with pytest.raises(UsageError) as err:
        parse_positions("a,b", 6)
    assert "'0,2,4,6'" in str(err.value)  # the example fits the trajectory's K


def test_convexify_rejects_bad_positions() -> None:
    with pytest.raises(UsageError):
        convexify(TINY, SIZES, [0, 2, 5])
    with pytest.raises(ValueError):
        convexify(TINY, [1, 1], TINY_POS)
