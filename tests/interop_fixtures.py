"""Fixture writers for the interop tests: files in the exact layouts the MTT-family scripts write.

Written from the format descriptions in /work/shared/method.md (§4 replay buffers, §5 the MCT
authors' waypoint/step pairs), not from the scripts' code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mctool.models import ModelSpec, build_model

Expert = list[list[torch.Tensor]]  # K+1 snapshots, each the parameter tensors in module order


def tiny_spec(width: int = 8, depth: int = 3) -> ModelSpec:
    """The tiny ConvNet of the tests' 28 px greyscale MNIST-format data."""
    return ModelSpec(depth=depth, width=width, channels=1, num_classes=10, im_size=(28, 28))


def make_experts(spec: ModelSpec, n: int, K: int, seed: int = 0, step: float = 0.02) -> list[Expert]:
    """n random-walk trajectories θ_0..θ_K from the network's own initialisation (every snapshot a copy)."""
    gen = torch.Generator().manual_seed(seed)
    experts = []
    for i in range(n):
        params = [p.detach().clone() for p in build_model(spec, seed=seed * 1000 + i).parameters()]
        snaps = [[p.clone() for p in params]]
        for _ in range(K):
            params = [p + step * torch.randn(p.shape, generator=gen) for p in params]
            snaps.append([p.clone() for p in params])
        experts.append(snaps)
    return experts


def flat(expert: Expert) -> torch.Tensor:
    """An expert as [K+1, P] (layout order)."""
    return torch.stack([torch.cat([t.reshape(-1) for t in snap]) for snap in expert])


def write_replay_buffer(folder: Path, number: int, experts: list[Expert]) -> Path:
    """replay_buffer_{number}.pt: a torch-saved list of experts (method.md §4)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"replay_buffer_{number}.pt"
    torch.save(experts, path)
    return path


def authors_indices(K: int, ip: int) -> list[int]:
    """Waypoint indices for num_interpolation = ip (method.md §5.3)."""
    if ip == 2:
        return [0, K]
    step = (K + 1) // (ip - 1)
    idx = [i for i in range(0, K + 1, step)]
    if idx[-1] != K:
        idx.append(K)
    return idx


def _betas(snaps: Expert, a: int, b: int) -> list[list[torch.Tensor]]:
    """β_l(k) for k = a..b (method.md §5.1): cumulative per-layer step norms / their sum (1 if 0)."""
    L = len(snaps[0])
    d = [[float(torch.linalg.vector_norm(snaps[i + 1][l].double() - snaps[i][l].double())) for l in range(L)]
         for i in range(a, b)]
    totals = [sum(d[i][l] for i in range(b - a)) or 1.0 for l in range(L)]
    out = []
    for k in range(b - a + 1):
        out.append([torch.tensor(sum(d[i][l] for i in range(k)) / totals[l], dtype=torch.float32)
                    for l in range(L)])
    return out


def compress_expert(snaps: Expert, ip: int) -> tuple[list[list[torch.Tensor]], list]:
    """(waypoints, step entries) of one expert as the authors' compression writes them (§5.3, §5.5)."""
    K = len(snaps) - 1
    idx = authors_indices(K, ip)
    if ip == 2:
        return [[t.clone() for t in snaps[0]], [t.clone() for t in snaps[K]]], _betas(snaps, 0, K)
    steps = [_betas(snaps, a, b) for a, b in zip(idx, idx[1:])]  # from the RAW snapshots
    work = [[t.clone() for t in s] for s in snaps]
    for w in idx[1:-1]:  # in index order, in place: the neighbours' mean, weight 0 on itself
        work[w] = [(x + y) / 2 for x, y in zip(work[w - 1], work[w + 1])]
    work[K] = [(x + y) / 2 for x, y in zip(work[K - 1], work[K])]
    return [work[i] for i in idx], steps


def write_authors_pair(folder: Path, number: int, experts: list[Expert], ip: int) -> tuple[Path, Path]:
    """waypoint_buffer[_ip{ip}]_{n}.pt and step_buffer[_ip{ip}]_{n}.pt (method.md §5.5)."""
    folder.mkdir(parents=True, exist_ok=True)
    infix = "" if ip == 2 else f"ip{ip}_"
    pairs = [compress_expert(e, ip) for e in experts]
    wpath, spath = folder / f"waypoint_buffer_{infix}{number}.pt", folder / f"step_buffer_{infix}{number}.pt"
    torch.save([w for w, _ in pairs], wpath)
    torch.save([s for _, s in pairs], spath)
    return wpath, spath


def ablation_fractions(snaps: Expert, kind: str) -> list[float]:
    """β(k), k = 0..K, of the authors' ablations (method.md §5.4), one value for every layer:
    uniform k/K; decreasing Σ_{j≤k} (K+1−j)/S with S = Σ_{i=1}^{K+1} i (β(0) ≠ 0 as written);
    projected ⟨θ_k − θ_0, θ_K − θ_0⟩ / ‖θ_K − θ_0‖² on the whole flat vector, not clamped."""
    K = len(snaps) - 1
    if kind == "uni":
        return [k / K for k in range(K + 1)]
    if kind == "dec":
        S = sum(range(1, K + 2))
        return [sum(K + 1 - j for j in range(k + 1)) / S for k in range(K + 1)]
    x = flat(snaps).double()
    v = x[K] - x[0]
    return [float(torch.dot(x[k] - x[0], v) / torch.dot(v, v)) for k in range(K + 1)]


def write_ablation_pair(folder: Path, number: int, experts: list[Expert], kind: str) -> tuple[Path, Path]:
    """waypoint_buffer_{kind}_{n}.pt / step_buffer_{kind}_{n}.pt: raw [θ_0, θ_K] and the ablation's β."""
    folder.mkdir(parents=True, exist_ok=True)
    wpath, spath = folder / f"waypoint_buffer_{kind}_{number}.pt", folder / f"step_buffer_{kind}_{number}.pt"
    torch.save([[[t.clone() for t in e[0]], [t.clone() for t in e[-1]]] for e in experts], wpath)
    steps = []
    for e in experts:
        L = len(e[0])
        steps.append([[torch.tensor(f, dtype=torch.float32) for _ in range(L)] for f in ablation_fractions(e, kind)])
    torch.save(steps, spath)
    return wpath, spath


def authors_point(waypoint_file: Path, step_file: Path, e: int, n: float) -> list[torch.Tensor]:
    """The authors' reconstruction at real position n (method.md §5.2), re-derived in float64 from
    their files: segment j with p_j ≤ n < p_{j+1}, k = ⌊n⌋ − p_j, β_l = lerp(s_j(k), s_j(k+1), n − ⌊n⌋),
    θ_l = W_j,l + β_l (W_{j+1},l − W_j,l)."""
    import math

    waypoints = torch.load(waypoint_file)[e]
    steps = torch.load(step_file)[e]
    segments = steps if isinstance(steps[0][0], list) else [steps]
    starts = [0]
    for seg in segments:
        starts.append(starts[-1] + len(seg) - 1)
    j = max(i for i in range(len(segments)) if starts[i] <= n)
    k, frac = math.floor(n) - starts[j], n - math.floor(n)
    seg = segments[j]
    out = []
    for l, (a, b) in enumerate(zip(waypoints[j], waypoints[j + 1])):
        s0 = float(seg[k][l])
        s1 = float(seg[k + 1][l]) if k + 1 < len(seg) else s0
        beta = s0 + frac * (s1 - s0)
        out.append(a.double() + beta * (b.double() - a.double()))
    return out
