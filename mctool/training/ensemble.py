"""Train several networks of one architecture together: stacked parameters, grouped convolutions.

An evaluation trains 5 fresh networks on 10–500 images; on a GPU one such step is far too
small to fill the device. Here the R networks' layers become one layer each: R convolutions
one grouped convolution (groups = R), R norms one norm over R×C channels, R linear layers one
batched matrix product. Each network keeps its own initial weights, its own CPU generator for
shuffles and DSA draws — drawing exactly what `mctool.training.train.train` draws for it alone — and
its own SGD state, so the result equals training them one after another, up to the rounding
of a differently ordered sum.

Why grouped convolutions and not torch.func.vmap(functional_call): on the CPU the hand-built
grouped network was faster than vmap at every size measured (bench/README.md, "Evaluation
ensembles"): vmap's batching rules add copies and a separate affine pass after group norm.

Stacking supports the plain "features → flatten → classifier" networks (ConvNet and its
variants, BatchNorm included; MLP, LeNet, AlexNet, VGG11/VGG11BN); anything else (ResNet18)
trains one network after another through `train.train`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mctool.models import ConvNet, zoo
from mctool.data.augment import DSA, AugParams
from mctool.core.errors import TrainingDiverged
from mctool.training.train import Schedule, train

# Called after every epoch of every network: (network index, epoch (1-based), mean loss).
EpochHook = Callable[[int, int, float], None]

_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.LeakyReLU, nn.Tanh, nn.GELU, nn.Identity)
_POOLS = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _layers(model: nn.Module) -> list[nn.Module] | None:
    """The network as the plain chain of layers its forward runs, or None if it is not one."""
    def seq(m: nn.Module) -> list[nn.Module]:
        return list(m) if isinstance(m, nn.Sequential) else [m]

    # These classes' forward is exactly classifier(features(x).flatten(1)) (MLP: classifier(x)).
    if type(model) in (ConvNet, zoo.LeNet, zoo.AlexNet, zoo.VGG11):
        return seq(model.features) + [nn.Flatten()] + seq(model.classifier)
    if type(model) is zoo.MLP:
        return seq(model.classifier)
    return None


def _supported(layer: nn.Module, flat: bool) -> bool:
    """Whether one layer can be stacked (`flat`: it runs after the flatten, on R×B×F)."""
    if isinstance(layer, _ELEMENTWISE):
        return True
    if isinstance(layer, nn.Flatten):
        return not flat and layer.start_dim == 1 and layer.end_dim == -1
    if isinstance(layer, nn.Linear):
        return flat
    if flat:
        return False
    if isinstance(layer, nn.Conv2d):
        return layer.padding_mode == "zeros"
    if isinstance(layer, nn.BatchNorm2d):
        # A None momentum (cumulative average) would need each network's own step count.
        return layer.momentum is not None and layer.affine
    if isinstance(layer, nn.GroupNorm):
        return layer.affine
    if isinstance(layer, nn.LayerNorm):
        return len(layer.normalized_shape) == 3 and layer.elementwise_affine and layer.bias is not None
    return isinstance(layer, _POOLS)


def stackable(model: nn.Module) -> bool:
    """Whether networks like `model` can be trained together (else: one after another)."""
    layers = _layers(model)
    if layers is None:
        return False
    flat = False
    for layer in layers:
        if not _supported(layer, flat):
            return False
        flat = flat or isinstance(layer, nn.Flatten)
    return flat and all(p.requires_grad for p in model.parameters())


def _share(tensors: list[torch.Tensor], stack: bool) -> torch.Tensor:
    """One tensor holding the R networks' tensors (stacked, or concatenated along dim 0); each
    network's tensor becomes a view of it, so updates show in the modules without a copy."""
    big = torch.stack([t.detach() for t in tensors]) if stack else torch.cat([t.detach() for t in tensors])
    n = 1 if stack else tensors[0].shape[0]
    for r, t in enumerate(tensors):
        t.data = big[r] if stack else big[r * n:(r + 1) * n]
    return big


class StackedNet:
    """R networks of one stackable architecture run as one: `net(x)` maps B×R×C×H×W to R×B×K.

    Building it makes every module's parameters (and BatchNorm buffers) views of the stacked
    tensors in `params`: training those trains the modules in place.
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        if not models or not stackable(models[0]):
            raise ValueError("StackedNet needs one or more networks of a stackable architecture")
        self.size = len(models)
        per_model = [_layers(m) for m in models]
        if any(layers is None or len(layers) != len(per_model[0]) for layers in per_model):
            raise ValueError("StackedNet needs networks of one architecture")
        self.params: list[torch.Tensor] = []
        self._counters: list[torch.Tensor] = []
        self._ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
        flat = False
        for group in zip(*per_model):
            self._ops.append(self._op(list(group), flat))
            flat = flat or isinstance(group[0], nn.Flatten)

    def _leaf(self, tensors: list[torch.Tensor], stack: bool) -> torch.Tensor:
        big = _share(tensors, stack).requires_grad_(True)
        self.params.append(big)
        return big

    def _op(self, group: list[nn.Module], flat: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """The stacked form of one layer of every network (B×R·C×H×W before the flatten, R×B×F after)."""
        R, m = self.size, group[0]
        if isinstance(m, nn.Flatten):
            return lambda h: h.reshape(h.shape[0], R, -1).transpose(0, 1)
        if isinstance(m, _ELEMENTWISE + _POOLS):
            return m  # per element or per channel: the same on any number of stacked channels
        if isinstance(m, nn.Linear):
            w = self._leaf([g.weight for g in group], stack=True)  # R×K×F
            b = self._leaf([g.bias for g in group], stack=True) if m.bias is not None else None
            if b is None:
                return lambda h: torch.bmm(h, w.transpose(1, 2))
            return lambda h: torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if isinstance(m, nn.Conv2d):
            w = self._leaf([g.weight for g in group], stack=False)  # R·O×I/g×kh×kw
            b = self._leaf([g.bias for g in group], stack=False) if m.bias is not None else None
            return lambda h: F.conv2d(h, w, b, m.stride, m.padding, m.dilation, m.groups * R)
        if isinstance(m, nn.GroupNorm):
            # Network r's channels are r·C … (r+1)·C − 1, so its G groups are groups r·G … of R·G.
            w = self._leaf([g.weight for g in group], stack=False)
            b = self._leaf([g.bias for g in group], stack=False)
            return lambda h: F.group_norm(h, m.num_groups * R, w, b, m.eps)
        if isinstance(m, nn.BatchNorm2d):
            # Per-channel statistics over (batch, H, W): each network's channels see only its own batch.
            w = self._leaf([g.weight for g in group], stack=False)
            b = self._leaf([g.bias for g in group], stack=False)
            if not m.track_running_stats:
                return lambda h: F.batch_norm(h, None, None, w, b, True, 0.0, m.eps)
            mean = _share([g.running_mean for g in group], stack=False)
            var = _share([g.running_var for g in group], stack=False)
            self._counters.append(_share([g.num_batches_tracked for g in group], stack=True))
            return lambda h: F.batch_norm(h, mean, var, w, b, True, m.momentum, m.eps)
        if isinstance(m, nn.LayerNorm):
            w = self._leaf([g.weight for g in group], stack=True)  # R×C×H×W
            b = self._leaf([g.bias for g in group], stack=True)

            def layer_norm(h: torch.Tensor) -> torch.Tensor:
                z = F.layer_norm(h.reshape(h.shape[0], R, -1), (w[0].numel(),), eps=m.eps)
                return (z * w.reshape(R, -1) + b.reshape(R, -1)).reshape(h.shape)

            return layer_norm
        raise ValueError(f"cannot stack {type(m).__name__}")  # unreachable after stackable()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits R×B×K of the R networks, network r on its images x[:, r] (x is B×R×C×H×W)."""
        h = x.reshape(x.shape[0], -1, *x.shape[3:])  # B×R·C×H×W: network r's channels are block r
        for op in self._ops:
            h = op(h)
        return h

    def count_step(self) -> None:
        """Advance the BatchNorm step counters, as each module's forward in train mode does."""
        for counter in self._counters:
            counter.add_(1)


def _augment(dsa: DSA, x: torch.Tensor, draws: list[AugParams]) -> torch.Tensor:
    """Network r's draw applied to its images x[:, r]; one `apply` per distinct op, not per network."""
    B, rest = x.shape[0], x.shape[2:]
    out = torch.empty_like(x)
    by_op: dict[str, list[int]] = {}
    for r, p in enumerate(draws):
        by_op.setdefault(p.op, []).append(r)
    for op, rs in by_op.items():
        if op == "none":
            out[:, rs] = x[:, rs]
            continue
        # Every op works per sample, so networks sharing an op share one call on their joint batch.
        joint = x[:, rs].transpose(0, 1).reshape(len(rs) * B, *rest)
        values = {k: torch.cat([draws[r].values[k] for r in rs]) for k in draws[rs[0]].values}
        y = dsa.apply(joint, AugParams(op, values))
        out[:, rs] = y.reshape(len(rs), B, *rest).transpose(0, 1)
    return out


def train_stacked(
    models: Sequence[nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    schedule: Schedule,
    augment: DSA | None,
    generators: Sequence[torch.Generator],
    on_epoch: EpochHook | None = None,
    on_batch: Callable[[], None] | None = None,
) -> list[list[float]]:
    """Train `models` (one stackable architecture) together in place, network r with
    `generators[r]` exactly as `train(models[r], ..., generators[r])` would; returns each
    network's mean training loss per epoch.

    `on_epoch(r, epoch, loss)` runs for every network after every epoch (the modules already
    hold that epoch's weights); `on_batch()` after every joint step.
    """
    R = len(models)
    if len(generators) != R:
        raise ValueError(f"{R} networks need {R} generators, got {len(generators)}")
    for m in models:
        m.train()
    net = StackedNet(models)
    lr = schedule.lr
    opt = _optimizer_for(net.params, schedule, lr)
    n, device = images.shape[0], images.device
    losses: list[list[float]] = [[] for _ in range(R)]
    for epoch in range(1, schedule.epochs + 1):
        # Each generator draws what train() draws for its network: one permutation per epoch,
        # then one augmentation per batch, in that order.
        order = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)  # R×n
        total = torch.zeros(R, device=device)
        for start in range(0, n, schedule.batch_size):
            idx = order[:, start:start + schedule.batch_size]  # R×B
            x = images[idx.t()]  # B×R×C×H×W
            if augment is not None:
                draws = [augment.sample(x.shape[0], x.shape[3], x.shape[4], g) for g in generators]
                x = _augment(augment, x, draws)
            logits = net(x)  # R×B×K
            target = labels[idx]
            per_sample = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1, *target.shape[2:]),
                                         reduction="none")
            loss = per_sample.view(R, -1).mean(1)  # each network's batch-mean loss, as train() takes it
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # network r's parameters get the gradient of its own loss only
            opt.step()
            net.count_step()
            total += loss.detach() * idx.shape[1]
            if on_batch is not None:
                on_batch()
        means = (total / n).tolist()  # one device sync per epoch, not per batch
        diverged = [m for m in means if not math.isfinite(m)]
        if diverged:  # as train() says it, for the first network that diverged
            raise TrainingDiverged(f"training loss became {diverged[0]} in epoch {epoch} (lr {lr:g}); "
                                   "try a smaller --lr")
        for r, mean_loss in enumerate(means):
            losses[r].append(mean_loss)
        if schedule.decay_epoch is not None and epoch == schedule.decay_epoch:
            lr *= 0.1
            opt = _optimizer_for(net.params, schedule, lr)  # momentum reset, as train() does
        if on_epoch is not None:
            for r, mean_loss in enumerate(means):
                on_epoch(r, epoch, mean_loss)
    return losses


def _optimizer_for(params: list[torch.Tensor], schedule: Schedule, lr: float) -> torch.optim.Optimizer:
    """train()'s SGD on the stacked tensors: elementwise, so each network's slice updates as alone."""
    return torch.optim.SGD(params, lr=lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)


# --------------------------------------------------------------------------- memory guard


def _available_bytes(device: torch.device) -> int | None:
    """Memory a group of networks may use: half of what the device has free (None: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return None


def training_bytes(model: nn.Module, sample_shape: Sequence[int], batch: int) -> int:
    """Rough bytes one network needs for a training step on `batch` samples: every layer's output
    (kept for the backward) twice over, for the gradients and workspace, plus weights, gradients
    and momentum. Measured on CPU for ConvNet-3 width 128, batch 256: 0.57 GiB per network
    (0.51 in a group of 5) against 1.07 estimated."""
    meta = copy.deepcopy(model).to("meta")
    count = [0]

    def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        count[0] += out.numel()

    for m in meta.modules():
        if not list(m.children()):
            m.register_forward_hook(hook)
    p = next(model.parameters())
    with torch.no_grad():
        meta(torch.empty((1, *sample_shape), device="meta", dtype=p.dtype))
    weights = sum(q.numel() for q in model.parameters())
    return (2 * batch * (count[0] + math.prod(sample_shape)) + 4 * weights) * p.element_size()


def group_sizes(runs: int, per_network_bytes: int, available: int | None, limit: int | None = None) -> list[int]:
    """Split `runs` networks into nearly equal groups that each fit `available` bytes (and `limit`)."""
    most = runs if limit is None else max(1, min(runs, limit))
    if available is not None and per_network_bytes > 0:
        most = max(1, min(most, available // per_network_bytes))
    groups = -(-runs // most)
    return [runs // groups + (1 if g < runs % groups else 0) for g in range(groups)]


def together_by_default(device: torch.device) -> bool:
    """Whether `train_many` stacks networks when not told: on GPUs, where one small network's
    steps leave the device idle. On the CPU a step is already compute-bound and the grouped
    kernels are slower than R plain ones (bench/README.md, "Evaluation ensembles")."""
    return device.type == "cuda"


def plan_groups(models: Sequence[nn.Module], images: torch.Tensor, schedule: Schedule,
                together: bool | None = None, max_together: int | None = None) -> list[int]:
    """Sizes of the consecutive groups `train_many` trains together (1: alone, through `train`)."""
    if together is None:
        together = together_by_default(images.device)
    if not (together and len(models) > 1 and stackable(models[0])):
        return [1] * len(models)
    need = training_bytes(models[0], images.shape[1:], min(schedule.batch_size, images.shape[0]))
    return group_sizes(len(models), need, _available_bytes(images.device), max_together)


def train_many(
    models: Sequence[nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    schedule: Schedule,
    augment: DSA | None,
    generators: Sequence[torch.Generator],
    on_epoch: EpochHook | None = None,
    on_batch: Callable[[], None] | None = None,
    together: bool | None = None,
    max_together: int | None = None,
) -> list[list[float]]:
    """Train every network on (images, labels) as `train(models[r], ..., generators[r])` would,
    in place; returns each network's mean training loss per epoch.

    `together` (None: `together_by_default`) stacks networks of a stackable architecture into
    groups that fit the device's memory (at most `max_together` each); others train one after
    another.
    """
    if len(generators) != len(models):
        raise ValueError(f"{len(models)} networks need {len(models)} generators, got {len(generators)}")
    sizes = plan_groups(models, images, schedule, together, max_together)
    losses: list[list[float]] = []
    start = 0
    for size in sizes:
        idx = list(range(start, start + size))
        if size == 1:
            hook = None if on_epoch is None else (lambda e, loss, i=start: on_epoch(i, e, loss))
            losses.append(train(models[start], images, labels, schedule, augment, generators[start], hook, on_batch))
        else:
            hook2 = None if on_epoch is None else (lambda r, e, loss, first=start: on_epoch(first + r, e, loss))
            losses += train_stacked([models[i] for i in idx], images, labels, schedule, augment,
                                    [generators[i] for i in idx], hook2, on_batch)
        start += size
    return losses
