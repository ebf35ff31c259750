r"""Hand-written second-order step for the ConvNet (instance norm, ReLU, average pooling).

The matching modes ``constant`` and ``adjoint`` need, per inner step, quantities of the form

    g = ∇_w ℓ(w, X)                      the plain parameter gradient,
    e = ∂/∂X [vᵀ ∇_w ℓ(w, X)]            the image term for a fixed direction v,
    h = ∇²_w ℓ(w, X) v                    the Hessian-vector product (adjoint only),

with ℓ the mean cross-entropy of the network on the batch X. Autograd gets e by a double
backward through the backward graph; GroupNorm's double backward is a composite of dozens of
elementwise kernels on full-size activations, and on CPU a whole ``constant`` iteration then
costs ~4.3× plain training steps (bench/distill.py, "constant-autograd"). Here the same
numbers come from one forward-over-reverse sweep written out by hand: a forward pass carrying
the tangent ẋ = Dx[v] of every activation, and a reverse pass carrying the adjoint
δ = ∂ℓ/∂x and its tangent δ̇. By symmetry of mixed partials, e = D_v(∇_X ℓ) = δ̇ at the input
and h = D_v(∇_w ℓ). It costs 7 convolutions per block (9 with h; a plain step: 3) and few
passes over the activations; a ``constant`` iteration comes to ~3.0× plain steps.

Per block, with J the Jacobian of standardisation x̂ = (a − μ)/σ over each (sample, channel)'s
H×W values, J u = (u − mean u − x̂ mean(u x̂))/σ (symmetric):

    forward     a = W*h + b          ȧ = W*ḣ + V*h + v_b
                x̂ = (a − μ)/σ         x̂̇ = J ȧ,  σ̇ = mean(x̂ ȧ)
                n = γx̂ + β           ṅ = γx̂̇ + v_γ x̂ + v_β
                r = relu(n), h' = pool(r)   (and the same masks/pooling for the tangents)
    reverse     δx̂ = γ δn            δ̇x̂ = γ δ̇n + v_γ δn
                δa = J δx̂            δ̇a = J δ̇x̂ − (x̂̇ mean(δx̂ x̂) + x̂ mean(δx̂ x̂̇))/σ − (σ̇/σ) δa
                δh = Wᵀ*δa           δ̇h = Wᵀ*δ̇a + Vᵀ*δa
                g_W = δa ⋆ h         ġ_W = δ̇a ⋆ h + δa ⋆ ḣ

The head is z = A f + c with ∂ℓ/∂z = (p·Σy − y)/B for labels y (one-hot or probabilities).
For learned labels it also gives the label term ∂/∂y [vᵀ∇_w ℓ] = ((ż·p)·1 − ż)/B from the
logits' tangent ż it forms anyway (``want_label``): no extra pass, O(B · classes) more work.
Only networks that are exactly conv → GroupNorm(C, C) → ReLU → AvgPool2d(2) blocks and a
linear classifier qualify (every preset's ConvNet); ``plan_for`` returns None for anything
else and the caller falls back to autograd. Tests compare both in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mctool.models.functional import FlatNet
from mctool.models import ConvNet


@dataclass(frozen=True)
class Block:
    """One conv → instance norm → ReLU → 2×2 average-pool block, by parameter name prefix."""

    conv: str  # e.g. "features.0"
    padding: tuple[int, int]
    norm: str  # e.g. "features.1"
    eps: float


@dataclass(frozen=True)
class Plan:
    """The layer structure the hand-written sweep follows."""

    blocks: tuple[Block, ...]
    head: str  # "classifier"


def plan_for(net: FlatNet) -> Plan | None:
    """The sweep plan for `net`, or None when its module is not a ConvNet this file handles."""
    module = net.module
    # Exactly ConvNet: a subclass may override forward().
    if type(module) is not ConvNet or not isinstance(module.classifier, nn.Linear):
        return None
    if module.classifier.bias is None:
        return None
    layers = list(module.features.named_children())
    if not layers or len(layers) % 4:
        return None
    blocks = []
    for i in range(0, len(layers), 4):
        (cname, conv), (nname, norm), (_, act), (_, pool) = layers[i : i + 4]
        if not (
            isinstance(conv, nn.Conv2d)
            and conv.bias is not None
            and conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple)
            and isinstance(norm, nn.GroupNorm)
            and norm.affine
            and norm.num_groups == norm.num_channels
            and isinstance(act, nn.ReLU)
            and isinstance(pool, nn.AvgPool2d)
            and _is_pair(pool.kernel_size, 2)
            and _is_pair(pool.stride, 2)
            and _is_pair(pool.padding, 0)
            and not pool.ceil_mode
            and pool.divisor_override is None
        ):
            return None
        padding = (int(conv.padding[0]), int(conv.padding[1]))
        blocks.append(Block(f"features.{cname}", padding, f"features.{nname}", float(norm.eps)))
    return Plan(tuple(blocks), "classifier")


def _is_pair(value: int | tuple[int, ...], n: int) -> bool:
    return value == n or value == (n, n)


@dataclass
class _Saved:
    """What the reverse pass of one block needs from its forward pass."""

    h: torch.Tensor  # block input
    hd: torch.Tensor | None  # its tangent (None for the images: X does not depend on w)
    xh: torch.Tensor  # x̂
    ad: torch.Tensor  # ȧ (x̂̇ = (ȧ − mean ȧ − x̂ σ̇)/σ is never formed)
    mad: torch.Tensor  # mean ȧ, [B, C, 1, 1]
    sd: torch.Tensor  # σ̇ = mean(x̂ ȧ), [B, C, 1, 1]
    rstd: torch.Tensor  # 1/σ, [B, C, 1, 1]
    mask: torch.Tensor  # 1.0 where n > 0, else 0.0 (in the activations' dtype)


def _mean_hw(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3), keepdim=True)


def _unpool_masked(d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mask ⊙ avgpool_backward(d): the adjoint of ReLU then 2×2 average pooling (a new tensor)."""
    b, c, h, w = mask.shape
    if h % 2 or w % 2:  # pooling dropped the last row/column: the general kernel handles it
        full = torch.ops.aten.avg_pool2d_backward(d, mask, [2, 2], [2, 2], [0, 0], False, True, None)
        return full.mul_(mask)
    d = d * 0.25
    if mask.is_contiguous(memory_format=torch.channels_last):
        # Multiply a copy of the mask by d broadcast over each 2×2 window, in NHWC memory
        # order (whole channel vectors at a time).
        out = mask.clone(memory_format=torch.channels_last)
        windows = out.permute(0, 2, 3, 1).view(b, h // 2, 2, w // 2, 2, c)
        windows.mul_(d.permute(0, 2, 3, 1)[:, :, None, :, None, :])
        return out
    return d.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2).mul_(mask)


def _conv_backward(
    grad_out: torch.Tensor,
    inp: torch.Tensor,
    weight: torch.Tensor,
    padding: tuple[int, int],
    need_input: bool,
    need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(∂/∂input, ∂/∂weight) of conv2d(inp, weight, padding) for the output adjoint `grad_out`."""
    gi, gw, _ = torch.ops.aten.convolution_backward(
        grad_out, inp, weight, None, [1, 1], list(padding), [1, 1], False, [0, 0], 1,
        [need_input, need_weight, False],
    )
    return gi, gw


def _input_grad_pair(
    g1: torch.Tensor,
    g2: torch.Tensor,
    inp: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    padding: tuple[int, int],
) -> torch.Tensor:
    """∂/∂inp of conv2d(inp, w1)·g1 + conv2d(inp, w2)·g2, as two GEMMs and one col2im.

    For the first layer (1–3 input channels) oneDNN's input-gradient kernel is slow on CPU;
    unfold-style GEMMs into the [B, C·k·k, H·W] column space and a single fold are not.
    """
    b, c_out = g1.shape[:2]
    kh, kw = w1.shape[-2:]
    cols = torch.matmul(w1.reshape(c_out, -1).t(), g1.reshape(b, c_out, -1))
    cols.baddbmm_(w2.reshape(c_out, -1).t().expand(b, -1, -1), g2.reshape(b, c_out, -1))
    return F.fold(cols, tuple(inp.shape[-2:]), (kh, kw), padding=padding)


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


Grads = dict[str, torch.Tensor]  # parameter name -> gradient (or Hessian-vector product) piece


@torch.no_grad()
def second_order(
    plan: Plan,
    net: FlatNet,
    w: torch.Tensor,
    v: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    want_hvp: bool = False,
    batch_size: int | None = None,
    want_label: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(g, e, h) for the mean cross-entropy ℓ(w, x) of `net` on labels `y` (see module docstring),
    and with `want_label` a fourth item: the label term ∂/∂y [vᵀ∇_w ℓ] [B, classes].

    Args:
        plan: ``plan_for(net)``.
        w, v: flat parameters and direction [P].
        x: the (already augmented) batch; e has its shape.
        y: int64 class indices [B] or float probabilities [B, classes].
        want_hvp: also return h = ∇²_w ℓ · v (else None).
        batch_size: the B that ℓ's mean divides by (default: x's rows). A micro-batch of a
            larger batch passes the whole batch's size, so that chunks sum to the batch's numbers.
        want_label: also return the label term ((ż·p)·1 − ż)/B per row, ż = ∂z/∂w·v the
            logits' tangent (ℓ is linear in the targets y: docs/method.md, "Learned labels").
    """
    params = net.unflatten(w)
    tang = net.unflatten(v)
    if x.device.type == "cpu":
        # NHWC: oneDNN's convolutions take it natively, and pooling and the per-channel
        # elementwise work run ~15 % faster in total (bench/distill.py). Not measured on CUDA.
        x = x.contiguous(memory_format=torch.channels_last)
    grads: Grads = {}
    hvps: Grads | None = {} if want_hvp else None

    saved: list[_Saved] = []
    h, hd = x, None
    for blk in plan.blocks:
        h, hd = _forward_block(blk, params, tang, h, hd, saved)
    total = x.shape[0] if batch_size is None else int(batch_size)
    label: list[torch.Tensor] = []
    dh, dhd = _head(plan.head, params, tang, h, hd, y, total, grads, hvps, label if want_label else None)
    for i in range(len(plan.blocks) - 1, -1, -1):
        dh, dhd = _reverse_block(plan.blocks[i], saved.pop(), params, tang, dh, dhd, i == 0, grads, hvps)

    g = torch.cat([grads[name].reshape(-1) for name in net.names])
    hv = torch.cat([hvps[name].reshape(-1) for name in net.names]) if hvps is not None else None
    return (g, dhd, hv, label[0]) if want_label else (g, dhd, hv)


def _forward_block(
    blk: Block,
    params: Grads,
    tang: Grads,
    h: torch.Tensor,
    hd: torch.Tensor | None,
    saved: list[_Saved],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's output and its tangent; appends what the reverse pass needs to `saved`."""
    wt, vt = params[f"{blk.conv}.weight"], tang[f"{blk.conv}.weight"]
    a = F.conv2d(h, wt, params[f"{blk.conv}.bias"], padding=blk.padding)
    ad = F.conv2d(h, vt, tang[f"{blk.conv}.bias"], padding=blk.padding)
    if hd is not None:
        ad += F.conv2d(hd, wt, None, padding=blk.padding)
    # Two-pass statistics (centre, then the mean square): torch's channels-last GroupNorm
    # kernel loses ~1e-3 relative precision in float32 when |mean| ≫ std, which conv
    # outputs with a bias often are (measured against float64).
    xh = a.sub_(_mean_hw(a))  # centred in place; a itself is not needed any more
    rstd = (_mean_hw(xh * xh) + blk.eps).rsqrt_()
    xh.mul_(rstd)
    mad, sd = _mean_hw(ad), _mean_hw(ad * xh)
    gamma, beta = _channel(params[f"{blk.norm}.weight"]), _channel(params[f"{blk.norm}.bias"])
    vgamma, vbeta = _channel(tang[f"{blk.norm}.weight"]), _channel(tang[f"{blk.norm}.bias"])
    k = gamma * rstd
    # n = γ x̂ + β;  ṅ = γ x̂̇ + v_γ x̂ + v_β = k ȧ + (v_γ − k σ̇) x̂ + (v_β − k mean ȧ)
    n = torch.addcmul(beta, xh, gamma)
    nd = torch.addcmul(vbeta - k * mad, ad, k).addcmul_(xh, vgamma - k * sd)
    mask = torch.gt(n, 0.0, out=torch.empty_like(n))  # ReLU's derivative as 1.0 / 0.0
    n.clamp_min_(0.0)
    saved.append(_Saved(h, hd, xh, ad, mad, sd, rstd, mask))
    return F.avg_pool2d(n, 2), F.avg_pool2d(nd.mul_(mask), 2)


def _head(
    name: str,
    params: Grads,
    tang: Grads,
    h: torch.Tensor,
    hd: torch.Tensor,
    y: torch.Tensor,
    total: int,
    grads: Grads,
    hvps: Grads | None,
    label: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier z = A f + c, ż = A ḟ + V_A f + v_c and the loss (divided by `total`): returns δh, δ̇h
    (and appends the label term ∂/∂y [vᵀ∇_w ℓ] = ((ż·p)·1 − ż)/total to `label` when given)."""
    A, VA = params[f"{name}.weight"], tang[f"{name}.weight"]
    f, fd = h.flatten(1), hd.flatten(1)
    z = torch.addmm(params[f"{name}.bias"], f, A.t())
    zd = torch.addmm(tang[f"{name}.bias"], fd, A.t()).addmm_(f, VA.t())
    # The loss is mctool.matching.secondorder.ce_loss's plain F.cross_entropy (mean over the batch, or the
    # sum over a chunk divided by `total`; no label smoothing, no class weights): change both together.
    p = torch.softmax(z, dim=1)
    pzd = (p * zd).sum(1, keepdim=True)
    pd = p * (zd - pzd)  # ṗ
    if label is not None:
        # CE_i = −Σ_c y_ic log p_ic is linear in y: ∂/∂y_ic [ż_iᵀ(p_i Σy_i − y_i)] = ż_i·p_i − ż_ic
        label.append((pzd - zd) / total)
    if y.dtype.is_floating_point:  # probabilities: ∂ℓ/∂z = (p Σy − y)/B
        ysum = y.sum(1, keepdim=True)
        dz = (p * ysum - y) / total
        dzd = pd * ysum / total
    else:
        dz = p.clone()
        dz[torch.arange(z.shape[0], device=z.device), y] -= 1.0
        dz /= total
        dzd = pd / total
    grads[f"{name}.weight"] = dz.t() @ f
    grads[f"{name}.bias"] = dz.sum(0)
    if hvps is not None:
        hvps[f"{name}.weight"] = dzd.t() @ f + dz.t() @ fd
        hvps[f"{name}.bias"] = dzd.sum(0)
    return (dz @ A).view_as(h), torch.addmm(dzd @ A, dz, VA).view_as(h)


def _reverse_block(
    blk: Block,
    s: _Saved,
    params: Grads,
    tang: Grads,
    dh: torch.Tensor,
    dhd: torch.Tensor,
    first: bool,
    grads: Grads,
    hvps: Grads | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Back through one block: fills its gradients, returns δ and δ̇ of its input (δ: None if `first`)."""
    gamma, vgamma = _channel(params[f"{blk.norm}.weight"]), _channel(tang[f"{blk.norm}.weight"])
    dn = _unpool_masked(dh, s.mask)
    dnd = _unpool_masked(dhd, s.mask)
    # Per-(sample, channel) means over H×W.
    m_n, m_nx, m_na = _mean_hw(dn), _mean_hw(dn * s.xh), _mean_hw(dn * s.ad)
    m_d, m_dx = _mean_hw(dnd), _mean_hw(dnd * s.xh)
    m_nxd = s.rstd * (m_na - s.mad * m_n - s.sd * m_nx)  # mean(δn x̂̇)
    hw = dn.shape[-1] * dn.shape[-2]
    grads[f"{blk.norm}.weight"] = m_nx.sum((0, 2, 3)) * hw
    grads[f"{blk.norm}.bias"] = m_n.sum((0, 2, 3)) * hw
    if hvps is not None:
        hvps[f"{blk.norm}.weight"] = (m_dx + m_nxd).sum((0, 2, 3)) * hw
        hvps[f"{blk.norm}.bias"] = m_d.sum((0, 2, 3)) * hw
    # δx̂ = γ δn, so ρ = mean(δx̂ x̂) = γ m_nx and τ = mean(δx̂ x̂̇) = γ m_nxd.
    k, rho, tau = gamma * s.rstd, gamma * m_nx, gamma * m_nxd
    srel = s.sd * s.rstd  # σ̇/σ
    c0, c1 = -k * m_n, -s.rstd * rho  # δa = J δx̂ = k δn + c0 + c1 x̂
    # δ̇a = J δ̇x̂ − (x̂̇ ρ + x̂ τ)/σ − (σ̇/σ) δa with δ̇x̂ = γ δ̇n + v_γ δn, expanded into
    # coefficients of δ̇n, δn, ȧ, x̂ and a constant (x̂̇ = (ȧ − mean ȧ − x̂ σ̇)/σ).
    r2rho = s.rstd * s.rstd * rho
    c_x = -s.rstd * (gamma * m_dx + vgamma * m_nx + tau) + r2rho * s.sd - srel * c1
    c_1 = -s.rstd * (gamma * m_d + vgamma * m_n) + r2rho * s.mad - srel * c0
    dad = dnd.mul_(k).add_(c_1).addcmul_(dn, vgamma * s.rstd - srel * k)
    dad.addcmul_(s.ad, -r2rho).addcmul_(s.xh, c_x)
    da = dn.mul_(k).add_(c0).addcmul_(s.xh, c1)

    wt, vt = params[f"{blk.conv}.weight"], tang[f"{blk.conv}.weight"]
    dh_in, gw = _conv_backward(da, s.h, wt, blk.padding, need_input=not first, need_weight=True)
    grads[f"{blk.conv}.weight"] = gw
    grads[f"{blk.conv}.bias"] = da.sum((0, 2, 3))
    want_hvp = hvps is not None
    if first and da.device.type == "cpu":  # the image term Wᵀ*δ̇a + Vᵀ*δa (see _input_grad_pair)
        dhd_in = _input_grad_pair(dad, da, s.h, wt, vt, blk.padding)
        gwd = _conv_backward(dad, s.h, wt, blk.padding, False, True)[1] if want_hvp else None
    else:
        dhd_in, gwd = _conv_backward(dad, s.h, wt, blk.padding, need_input=True, need_weight=want_hvp)
        dhd_in += _conv_backward(da, s.h, vt, blk.padding, need_input=True, need_weight=False)[0]
    if hvps is not None:
        hvps[f"{blk.conv}.bias"] = dad.sum((0, 2, 3))
        if s.hd is not None:
            gwd += _conv_backward(da, s.hd, wt, blk.padding, need_input=False, need_weight=True)[1]
        hvps[f"{blk.conv}.weight"] = gwd
    return dh_in, dhd_in
