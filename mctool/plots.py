"""Pictures of an artifact for `mctool inspect --png`: synset grid, β curves, accuracy along the path.

No matplotlib (not a dependency): image grids go through torchvision, line plots are drawn
with PIL.ImageDraw. Everything here is silent and best effort: a part the artifact lacks
(or a dataset that is not on disk) means a picture is skipped or simplified, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid, save_image

from mctool import artifact
from mctool.data import Preprocessing
from mctool.errors import ArtifactError, UsageError
from mctool.functional import FlatNet
from mctool.nets import ModelSpec, build_model
from mctool.prepared import Prepared, prepare_like
from mctool.trajectory import ConvexTrajectory

# At most this many images per class in a synset grid (ipc 50 would be unreadably wide).
MAX_PER_CLASS = 10
# At most this many β curves in one plot (a legend of 14+ colours stops being readable).
MAX_CURVES = 8
# Small images are upscaled (nearest) until their longer side reaches this many pixels.
_MIN_SIDE = 64
# Evaluation batch for the convexified path (bounded memory on any device).
_EVAL_BATCH = 1000

# tab10: distinct, colour-blind friendlier than pure RGB.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]

Series = tuple[str, Sequence[float], Sequence[float]]
T = TypeVar("T")


# --------------------------------------------------------------------------- image grids


def _upscale(images: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upscale so that tiny images (8-32 px) stay visible in a viewer."""
    side = max(images.shape[-2:])
    factor = max(1, _MIN_SIDE // max(1, side))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """Write images [N, C, H, W] in [0, 1] as one PNG grid with `nrow` images per row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _upscale(images.detach().to("cpu", torch.float32).clamp(0, 1))
    grid = make_grid(x, nrow=max(1, int(nrow)), padding=2, pad_value=1.0)
    save_image(grid, path)
    return path


def minmax_images(images: torch.Tensor) -> torch.Tensor:
    """Per-image min-max scaling to [0, 1] (when the preprocessing cannot be inverted)."""
    x = images.detach().float()
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(1, keepdim=True).values
    span = (flat.max(1, keepdim=True).values - lo).clamp_min(1e-12)  # a constant image -> black, not NaN
    return ((flat - lo) / span).view_as(x)


def synset_grid(images: torch.Tensor, prep: Preprocessing | None, ipc: int, path: Path) -> Path:
    """De-whitened synset grid, one row per class (images are class-major), ≤ 10 per class.

    `prep` None falls back to per-image min-max scaling."""
    x = images.detach().to("cpu", torch.float32)
    ipc = max(1, int(ipc))
    shown = min(ipc, MAX_PER_CLASS)
    if x.shape[0] % ipc == 0 and shown < ipc:
        # Class-major storage: keep the first `shown` of every class.
        x = x.view(x.shape[0] // ipc, ipc, *x.shape[1:])[:, :shown].reshape(-1, *x.shape[1:])
    pixels = prep.invert(x) if prep is not None else minmax_images(x)
    return save_grid(pixels, path, nrow=shown)


# --------------------------------------------------------------------------- line plots


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font (Pillow >= 10.1), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _nice_step(span: float, target: int = 5) -> float:
    """A step of 1, 2, 2.5 or 5 × 10^n giving about `target` intervals over `span`."""
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def nice_axis(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """Axis limits rounded out to a nice step, and the ~5 tick values between them."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        # A constant series: widen around the value so the range is never zero.
        pad = abs(lo) * 0.1 if lo != 0 else 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo)
    lo_n = math.floor(lo / step + 1e-9) * step
    hi_n = math.ceil(hi / step - 1e-9) * step
    n = int(round((hi_n - lo_n) / step))
    ticks = [lo_n + i * step for i in range(n + 1)]
    return lo_n, hi_n, ticks


def _tick_label(v: float) -> str:
    # Round away float noise (0.30000000000000004) and show -0 as 0.
    r = round(v, 10)
    return f"{0.0 if r == 0 else r:g}"


def _finite_range(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    return (min(finite), max(finite)) if finite else (math.nan, math.nan)


def _runs(xs: Sequence[float], ys: Sequence[float]) -> list[list[tuple[float, float]]]:
    """Consecutive runs of finite (x, y) points: a NaN breaks the line instead of joining across it."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(xs, ys):
        x, y = float(x), float(y)
        if math.isfinite(x) and math.isfinite(y):
            runs[-1].append((x, y))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def _dashed_vline(draw: ImageDraw.ImageDraw, x: float, top: int, bottom: int, colour: tuple[int, int, int]) -> None:
    y = top
    while y < bottom:
        draw.line([(x, y), (x, min(y + 6, bottom))], fill=colour, width=1)
        y += 11


def _vertical_text(img: Image.Image, text: str, font: ImageFont.ImageFont, x: int, cy: int) -> None:
    """Paste `text` rotated 90° (reading bottom-up) with its left edge at x, centred on cy."""
    probe = ImageDraw.Draw(img)
    w, h = _text_size(probe, text, font)
    tile = Image.new("RGB", (w + 4, h + 6), "white")
    ImageDraw.Draw(tile).text((2, 0), text, fill="black", font=font)
    tile = tile.rotate(90, expand=True)
    img.paste(tile, (x, int(cy - tile.height / 2)))


def line_plot(series: Sequence[Series], path: Path, title: str, xlabel: str, ylabel: str,
              vlines: Sequence[float] = (), size: tuple[int, int] = (800, 500)) -> Path:
    """Draw (label, xs, ys) series as coloured polylines with axes, ticks, legend and dashed vlines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = int(size[0]), int(size[1])
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, title_font = _font(13), _font(16)

    all_x = [float(v) for _, xs, _ in series for v in xs] + [float(v) for v in vlines]
    all_y = [float(v) for _, _, ys in series for v in ys]
    x0, x1, xticks = nice_axis(*_finite_range(all_x))
    y0, y1, yticks = nice_axis(*_finite_range(all_y))

    # Legend outside the plot area on the right, so curves are never hidden behind it.
    labels = [_shorten(label) for label, _, _ in series]
    legend_w = max((_text_size(draw, t, font)[0] for t in labels), default=0) + 42 if labels else 0
    legend_w = min(legend_w, width // 3)
    ytick_w = max(_text_size(draw, _tick_label(t), font)[0] for t in yticks)
    _, line_h = _text_size(draw, "Hg0", font)
    left = 12 + line_h + 8 + ytick_w + 8
    right = width - 15 - legend_w
    top = 16 + _text_size(draw, title or "H", title_font)[1] + 14
    bottom = height - (line_h * 2 + 24)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    # Grid and ticks.
    for t in yticks:
        y = py(t)
        draw.line([(left, y), (right, y)], fill=(235, 235, 235))
        draw.line([(left - 4, y), (left, y)], fill="black")
        label = _tick_label(t)
        tw, th = _text_size(draw, label, font)
        draw.text((left - 8 - tw, y - th / 2 - 2), label, fill="black", font=font)
    for t in xticks:
        x = px(t)
        draw.line([(x, top), (x, bottom)], fill=(235, 235, 235))
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        label = _tick_label(t)
        tw, _ = _text_size(draw, label, font)
        draw.text((x - tw / 2, bottom + 7), label, fill="black", font=font)
    for v in vlines:
        if math.isfinite(v) and x0 <= v <= x1:
            _dashed_vline(draw, px(v), top, bottom, (150, 150, 150))
    draw.rectangle([left, top, right, bottom], outline="black")

    # Curves: line runs between NaNs; an isolated point gets a dot so it does not vanish.
    for i, (_, xs, ys) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        for run in _runs(xs, ys):
            points = [(px(x), py(y)) for x, y in run]
            if len(points) == 1:
                (cx, cy), r = points[0], 3
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            else:
                draw.line(points, fill=colour, width=2, joint="curve")

    # Labels and title.
    tw, _ = _text_size(draw, xlabel, font)
    draw.text(((left + right) / 2 - tw / 2, bottom + line_h + 14), xlabel, fill="black", font=font)
    if ylabel:
        _vertical_text(img, ylabel, font, 8, int((top + bottom) / 2))
    tw, _ = _text_size(draw, title, title_font)
    draw.text((max(4, width / 2 - tw / 2), 12), title, fill="black", font=title_font)

    # Legend box.
    if labels:
        lx, ly = right + 12, top
        row = line_h + 8
        draw.rectangle([lx, ly, lx + legend_w, ly + row * len(labels) + 8], outline=(120, 120, 120), fill="white")
        for i, label in enumerate(labels):
            y = ly + 6 + i * row + row / 2 - 2
            draw.line([(lx + 6, y), (lx + 28, y)], fill=PALETTE[i % len(PALETTE)], width=3)
            draw.text((lx + 34, y - line_h / 2 - 2), label, fill="black", font=font)
    img.save(path)
    return path


def _shorten(label: str, limit: int = 32) -> str:
    """Keep legend labels on one line (long layer names keep their informative tail)."""
    return label if len(label) <= limit else "…" + label[-(limit - 1):]


# --------------------------------------------------------------------------- what an artifact holds


@dataclass
class _Convex:
    """The first convexified expert and what is needed to rebuild and plot its path."""

    expert: int
    positions: list[int]
    waypoints: torch.Tensor  # [I+2, P]
    beta: torch.Tensor  # [K+1, L]
    spec: ModelSpec
    layout: list[tuple[str, tuple[int, ...]]]


@dataclass
class _Contents:
    """Everything the pictures need, read once so the file is closed before any heavy work."""

    meta: artifact.DatasetMeta | None = None
    synset: tuple[torch.Tensor, int] | None = None  # images, ipc
    convex: _Convex | None = None
    accuracy: np.ndarray | None = None  # [E_done, K+1] stored test accuracy of done experts
    done: np.ndarray | None = None  # indices of the done experts (rows of `accuracy`)


def _read_synset(path: Path, f: h5py.File) -> tuple[torch.Tensor, int] | None:
    if not artifact.synset_names(f):
        return None
    g = artifact.pick_synset(path, f, None)
    if "images" not in g:
        return None
    images = torch.from_numpy(g["images"][()])
    if images.dim() != 4 or images.shape[0] == 0:
        return None
    return images, int(g.attrs.get("ipc", images.shape[0]))


def _read_convex(path: Path, f: h5py.File) -> _Convex | None:
    if "convex" not in f:
        return None
    meta = artifact.read_convex(path, f)  # ArtifactError when incomplete or inconsistent
    e = int(artifact.convex_experts(path, f)[0])
    waypoints, beta = artifact.read_convex_expert(f, e)
    spec, layout = artifact.read_model(path, f)
    return _Convex(e, list(meta.positions), waypoints, beta, spec, layout)


def _read_accuracy(f: h5py.File) -> tuple[np.ndarray, np.ndarray] | None:
    if "experts/done" not in f or "experts/test_accuracy" not in f:
        return None
    done = np.flatnonzero(f["experts/done"][()])
    if done.size == 0:
        return None
    return f["experts/test_accuracy"][()][done].astype(np.float64), done


def _optional(read: Callable[..., T], *args: Any) -> T | None:
    """`read(*args)`, or None when the part is missing or damaged (a picture to skip)."""
    try:
        return read(*args)
    except (ArtifactError, KeyError, ValueError):
        return None


def _read_contents(path: Path) -> _Contents:
    c = _Contents()
    with artifact.open_artifact(path) as f:
        c.meta = _optional(artifact.DatasetMeta.read, path, f)
        c.synset = _optional(_read_synset, path, f)
        c.convex = _optional(_read_convex, path, f)
        acc = _optional(_read_accuracy, f)
        if acc is not None:
            c.accuracy, c.done = acc
    return c


class _LazyData:
    """The artifact's dataset, loaded at most once and only if a picture needs it."""

    def __init__(self, meta: artifact.DatasetMeta | None, data_dir: Path | None, device: torch.device) -> None:
        self.meta, self.data_dir, self.device = meta, data_dir, device
        self._tried = False
        self._prepared: Prepared | None = None

    def get(self) -> Prepared | None:
        """The Prepared dataset, or None when it is not available (not on disk, different split)."""
        if not self._tried and self.meta is not None:
            self._tried = True
            try:
                self._prepared = prepare_like(self.meta, self.data_dir, self.device)
            except UsageError:  # DatasetNotFound, unknown name, fingerprint mismatch
                self._prepared = None
        return self._prepared


# --------------------------------------------------------------------------- the three pictures


def _layer_picks(num_layers: int) -> list[int]:
    """All layers, or MAX_CURVES evenly spaced ones (always including the first and last)."""
    if num_layers <= MAX_CURVES:
        return list(range(num_layers))
    return sorted({int(round(v)) for v in np.linspace(0, num_layers - 1, MAX_CURVES)})


def beta_plot(cv: _Convex, path: Path) -> Path:
    """β (global position along the waypoints) of each layer against the epoch."""
    beta = cv.beta.double().numpy()
    epochs = list(range(beta.shape[0]))
    picks = _layer_picks(beta.shape[1])
    names = [n for n, _ in cv.layout]
    series = [(names[j] if j < len(names) else f"layer {j}", epochs, beta[:, j].tolist()) for j in picks]
    title = f"β per layer, expert {cv.expert}"
    if len(picks) < beta.shape[1]:
        title += f" ({len(picks)} of {beta.shape[1]} layers, evenly spaced)"
    return line_plot(series, path, title, "epoch", "β (waypoint index + segment fraction)",
                     vlines=[float(p) for p in cv.positions])


@torch.no_grad()
def convexified_accuracy(spec: ModelSpec, traj: ConvexTrajectory, test_x: torch.Tensor,
                         test_y: torch.Tensor) -> list[float]:
    """Test accuracy of θ̂(k) at every integer epoch k = 0..K of a convexified path."""
    device = test_x.device
    net = FlatNet(build_model(spec).to(device).eval())
    if net.num_params != traj.waypoints.shape[1]:
        raise ArtifactError(f"/model builds {net.num_params} parameters, /convex holds {traj.waypoints.shape[1]}")
    traj = traj.to(device)
    n = max(1, test_x.shape[0])
    out = []
    for k in range(traj.K + 1):
        flat = traj.at(k)
        correct = 0
        for start in range(0, test_x.shape[0], _EVAL_BATCH):
            logits = net(flat, test_x[start:start + _EVAL_BATCH])
            correct += int((logits.argmax(1) == test_y[start:start + _EVAL_BATCH]).sum())
        out.append(correct / n)
    return out


def _column_mean(rows: np.ndarray) -> list[float]:
    """Mean of each column over its finite entries (NaN where there are none), without warnings."""
    finite = np.isfinite(rows)
    count = finite.sum(0)
    total = np.where(finite, rows, 0.0).sum(0)
    return [float(t / c) if c else math.nan for t, c in zip(total, count)]


def accuracy_plot(c: _Contents, data: _LazyData, path: Path) -> Path:
    """Stored mean expert accuracy per epoch, plus the first convexified expert raw vs convexified."""
    assert c.accuracy is not None and c.done is not None
    epochs = list(range(c.accuracy.shape[1]))
    series: list[Series] = [("expert (stored)", epochs, [100 * v for v in _column_mean(c.accuracy)])]
    vlines: list[float] = []
    cv = c.convex
    if cv is not None and cv.beta.shape[0] == len(epochs):
        vlines = [float(p) for p in cv.positions]
        rows = np.flatnonzero(c.done == cv.expert)
        if rows.size:
            series.append((f"expert {cv.expert} trajectory", epochs, (100 * c.accuracy[rows[0]]).tolist()))
        prepared = data.get()
        if prepared is not None:
            traj = ConvexTrajectory(cv.waypoints, cv.beta, cv.positions, artifact.layer_sizes(cv.layout))
            acc = _optional(convexified_accuracy, cv.spec, traj, prepared.test_x, prepared.test_y)
            if acc is not None:
                series.append((f"expert {cv.expert} convexified", epochs, [100 * v for v in acc]))
    title = f"test accuracy along the trajectory (mean of {len(c.done)} experts)"
    return line_plot(series, path, title, "epoch", "test accuracy (%)", vlines=vlines)


def _suffixed(png: Path, what: str) -> Path:
    """out/overview.png -> out/overview-<what>.png."""
    png = Path(png)
    return png.with_name(f"{png.stem}-{what}.png")


def write_overview(file: Path, png: Path, data_dir: Path | None = None,
                   device: torch.device | None = None) -> list[Path]:
    """Write the pictures the artifact supports (synset grid, β curves, accuracy); their paths."""
    if device is None:
        from mctool.device import resolve_device

        device = resolve_device("auto")
    c = _read_contents(Path(file))
    data = _LazyData(c.meta, data_dir, device)
    written: list[Path] = []
    if c.synset is not None:
        images, ipc = c.synset
        prepared = data.get()
        prep = prepared.prep if prepared is not None else None
        try:
            written.append(synset_grid(images, prep, ipc, _suffixed(png, "synset")))
        except ValueError:  # images do not fit the dataset's preprocessing: show them min-max scaled
            written.append(synset_grid(images, None, ipc, _suffixed(png, "synset")))
    if c.convex is not None:
        written.append(beta_plot(c.convex, _suffixed(png, "beta")))
    if c.accuracy is not None:
        written.append(accuracy_plot(c, data, _suffixed(png, "accuracy")))
    return written
