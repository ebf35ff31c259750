"""Pictures of an artifact for `mctool inspect --png`: synset grid, β curves, accuracy along the path.

No matplotlib (not a dependency): image grids go through torchvision, line plots are drawn
with PIL.ImageDraw. Everything here is silent and best effort: a part the artifact lacks
(or a dataset that is not on disk) means a picture is skipped or simplified, never an error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid, save_image

from mctool import store
from mctool.data.datasets import Preprocessing
from mctool.core.device import resolve_device
from mctool.core.errors import ArtifactError, UsageError
from mctool.models.functional import FlatNet
from mctool.models import ModelSpec, build_model, layer_sizes
from mctool.data.prepared import Prepared, prepare_like
from mctool.core.progress import SILENT, Reporter
from mctool.core.text import clean_text
from mctool.convexify.trajectory import ConvexTrajectory

# At most this many images per class in a synset grid (ipc 50 would be unreadably wide).
MAX_PER_CLASS = 10
# At most this many β curves in one plot (a legend of 14+ colours stops being readable).
MAX_CURVES = 8
# The dashed vertical lines of the β and accuracy plots: the epochs the waypoints were taken at.
WAYPOINTS_LABEL = "waypoint epochs (dashed)"
# Small images are upscaled (nearest) until their longer side reaches this many pixels.
_MIN_SIDE = 64
# Evaluation batch for the convexified path (bounded memory on any device).
_EVAL_BATCH = 1000
# On CPU, ConvNet-128 on 10 000 test images at each of K+1 = 51 epochs takes tens of minutes;
# a strided subset of this many images keeps `inspect --png` to a minute or two (labelled).
CPU_TEST_IMAGES = 1000
# Models this small are scored on the whole test split even on CPU (seconds), so the
# convexified curve is comparable point by point with the stored whole-split accuracy.
SMALL_MODEL_PARAMS = 200_000

# tab10: distinct, colour-blind friendlier than pure RGB.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]

Series = tuple[str, Sequence[float], Sequence[float]]


# --------------------------------------------------------------------------- image grids


def _upscale(images: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour upscale so that tiny images (8-32 px) stay visible in a viewer."""
    side = max(images.shape[-2:])
    factor = max(1, _MIN_SIDE // max(1, side))
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def save_grid(images: torch.Tensor, path: Path, nrow: int, title: str | None = None,
              row_labels: Sequence[str] | None = None) -> Path:
    """Write images [N, C, H, W] in [0, 1] as one PNG grid with `nrow` images per row, under a
    `title` (lines split at newlines and wrapped to the picture's width) when one is given, with
    `row_labels` in a column on the left (one per row of the grid) when given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _upscale(images.detach().to("cpu", torch.float32).clamp(0, 1))
    grid = make_grid(x, nrow=max(1, int(nrow)), padding=2, pad_value=1.0)
    if title is None and not row_labels:
        store.write_atomically(path, lambda fh: save_image(grid, fh, format="png"))  # never through a link
        return path
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels).convert("RGB")
    font, title_font = _font(13), _font(14)
    draw = ImageDraw.Draw(picture)
    labels = [_shorten(draw, str(t), font, _LABEL_MAX) for t in row_labels or ()]
    label_w = max((_text_size(draw, t, font)[0] for t in labels), default=-8) + 8
    width = max(label_w + picture.width, _MIN_CAPTION_WIDTH if title else 0)
    lines = [w for line in (title or "").splitlines() for w in _wrap(draw, line, title_font, width - 16)]
    line_h = _line_height(title_font)
    band = (len(lines) * line_h + 10) if lines else 0
    out = Image.new("RGB", (width, band + picture.height), "white")
    out.paste(picture, (label_w, band))
    canvas = ImageDraw.Draw(out)
    for k, line in enumerate(lines):
        canvas.text((4, 4 + k * line_h), line, fill="black", font=title_font)
    if labels:
        rows = math.ceil(x.shape[0] / max(1, int(nrow)))
        tile = (picture.height - 2) / max(1, rows)  # make_grid: 2 px padding around and between tiles
        for r, label in enumerate(labels[:rows]):
            tw, th = _text_size(canvas, label, font)
            canvas.text((label_w - 6 - tw, band + 2 + r * tile + (tile - 2 - th) / 2 - 2), label, fill="black",
                        font=font)
    store.write_atomically(path, lambda fh: out.save(fh, format="PNG"))  # never through a link
    return path


# Room a row label may take (longer class names are shortened), and the narrowest captioned picture.
_LABEL_MAX = 170
_MIN_CAPTION_WIDTH = 420


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    """The distance between two lines of `font`: its ascent + descent (a bitmap font: its box)."""
    try:
        ascent, descent = font.getmetrics()  # type: ignore[union-attr]
        return int(ascent + descent) + 2
    except AttributeError:
        return int(font.getbbox("Hg0")[3]) + 4


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and _text_size(draw, lines[-1] + " " + word, font)[0] <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def _shorten(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float) -> str:
    """`text`, cut at the end with "…" to fit `width`."""
    if _text_size(draw, text, font)[0] <= width:
        return text
    while len(text) > 1 and _text_size(draw, text + "…", font)[0] > width:
        text = text[:-1]
    return text.rstrip() + "…"


def minmax_images(images: torch.Tensor) -> torch.Tensor:
    """Per-image min-max scaling to [0, 1] (when the preprocessing cannot be inverted)."""
    x = images.detach().float()
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(1, keepdim=True).values
    span = (flat.max(1, keepdim=True).values - lo).clamp_min(1e-12)  # a constant image -> black, not NaN
    return ((flat - lo) / span).view_as(x)


def synset_png_path(out: Path, name: str) -> Path:
    """Where the picture of synset `name` in `out` goes: `synset.h5` -> `synset-NAME.png`."""
    return out.with_name(f"{out.stem}-{name}.png")


def synset_grid(images: torch.Tensor, prep: Preprocessing | None, ipc: int, path: Path,
                title: str | None = None, class_names: Sequence[str] | None = None) -> Path:
    """De-whitened synset grid, one row per class (images are class-major), ≤ 10 per class, each
    row labelled with its class when `class_names` are given.

    `prep` None falls back to per-image min-max scaling."""
    x = images.detach().to("cpu", torch.float32)
    ipc = max(1, int(ipc))
    shown = min(ipc, MAX_PER_CLASS)
    if x.shape[0] % ipc == 0 and shown < ipc:
        # Class-major storage: keep the first `shown` of every class.
        x = x.view(x.shape[0] // ipc, ipc, *x.shape[1:])[:, :shown].reshape(-1, *x.shape[1:])
    pixels = prep.invert(x) if prep is not None else minmax_images(x)
    return save_grid(pixels, path, nrow=shown, title=title, row_labels=class_names)


def synset_caption(syn: store.Synset, meta: store.DatasetMeta, best: bool = False, dewhitened: bool = True) -> str:
    """What a synset picture shows, line by line: that the images are synthetic, the dataset,
    synset and ipc, which images (final, or best: of which iteration, selected on what), and how
    they are displayed."""
    shown = min(syn.ipc, MAX_PER_CLASS)
    per_class = f"{syn.ipc} per class" + (f", the first {shown} shown" if shown < syn.ipc else "")
    target = syn.config.get("iterations")
    of = f" of {target}" if isinstance(target, int) and target != syn.iterations else ""
    if best and syn.best is not None:
        b = syn.best
        score = b.score.get("mean")
        scored = f" ({100 * score:.1f}% there)" if isinstance(score, float) and math.isfinite(score) else ""
        where = "the TEST split (the authors' protocol)" if b.selected_on == "test" else \
            f"a {b.selected_on} split held out of the training set"
        which = f"best images: iteration {b.iteration}{of or f' of {syn.iterations}'}, selected on {where}{scored}"
    else:
        which = (f"final images after {syn.iterations}{of} iterations" if syn.complete else
                 f"latest images of a run not finished: iteration {syn.iterations}{of}")
    ema = syn.config.get("ema")
    if isinstance(ema, (int, float)) and not isinstance(ema, bool) and 0 < ema < 1:
        which += f" (their moving average, --ema {ema:g})"
    how = ("de-whitened for display" if meta.zca else "de-normalised for display") if dewhitened else \
        "each image min-max scaled (the dataset's preprocessing was not available)"
    rows = "one row per class" + (" (the class each image was made for; its labels are learned)"
                                  if syn.config.get("learn_labels") is True else "")
    return (f"Synthetic images ({syn.method.upper()} distillation), not real ones: {meta.name}, synset "
            f"'{clean_text(syn.name)}', ipc {syn.ipc} ({per_class})\n{which}\n{rows}; {how}")


def class_labels(meta: store.DatasetMeta) -> list[str]:
    """Row labels of a synset grid: 'index name' per class (the name alone when it is the index,
    as MNIST's; 'class i' when the names are unknown)."""
    names = [clean_text(n) for n in meta.class_names] if len(meta.class_names) == meta.num_classes else []
    return [(names[i] if names[i] == str(i) else f"{i} {names[i]}") if names else f"class {i}"
            for i in range(meta.num_classes)]


def synset_picture(syn: store.Synset, meta: store.DatasetMeta, prep: Preprocessing | None, path: Path,
                   best: bool = False) -> Path:
    """The synset's final (or best) images as a grid that says what it shows (synset_caption) and
    which class each row is."""
    images = syn.best.images if best and syn.best is not None else syn.images
    return synset_grid(images, prep, syn.ipc, path, synset_caption(syn, meta, best, prep is not None),
                       class_labels(meta))


# --------------------------------------------------------------------------- line plots

# Drawn at this multiple of the requested size, then downsampled: PIL lines are not antialiased.
_SUPERSAMPLE = 2


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans when installed, else Pillow's built-in scalable font, else its bitmap font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _nice_step(span: float, integer: bool, target: int = 5) -> float:
    """The 1, 2, 2.5 or 5 × 10^n step giving closest to `target` intervals over `span`."""
    mag = 10 ** math.floor(math.log10(span / target))
    candidates = [m * mag for m in (1, 2, 2.5, 5, 10)]
    if integer:  # epochs: whole-number ticks only
        candidates = [c for c in candidates if c >= 1 and float(c).is_integer()] or [1.0]
    # Ties go to the larger step (fewer, rounder labels).
    return min(reversed(candidates), key=lambda c: abs(span / c - target))


def nice_axis(lo: float, hi: float, integer: bool = False) -> tuple[float, float, list[float]]:
    """Axis limits rounded out to a nice step, and the ~5 tick values between them."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        # A constant series: widen around the value so the range is never zero.
        pad = max(abs(lo) * 0.1, 1.0 if integer else 0.0) if lo != 0 else 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, integer)
    lo_n = math.floor(lo / step + 1e-9) * step
    hi_n = math.ceil(hi / step - 1e-9) * step
    n = int(round((hi_n - lo_n) / step))
    ticks = [lo_n + i * step for i in range(n + 1)]
    return lo_n, hi_n, ticks


def _tick_label(v: float) -> str:
    # Round away float noise (0.6000000000000001) and show -0 as 0.
    r = round(v, 10)
    return f"{0.0 if r == 0 else r:g}"


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _axis(values: list[float]) -> tuple[float, float, list[float]]:
    """Nice axis over the finite values; whole-number ticks when every value is a whole number."""
    finite = _finite(values)
    if not finite:
        return nice_axis(math.nan, math.nan)
    return nice_axis(min(finite), max(finite), integer=all(float(v).is_integer() for v in finite))


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


@dataclass
class _Frame:
    """Pixel geometry of the plot area and the data range it shows."""

    left: float
    top: float
    right: float
    bottom: float
    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)


class _Canvas:
    """A supersampled PIL image with fonts and lengths in output pixels × _SUPERSAMPLE."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.s = _SUPERSAMPLE
        self.size = (int(size[0]), int(size[1]))
        self.img = Image.new("RGB", (self.size[0] * self.s, self.size[1] * self.s), "white")
        self.draw = ImageDraw.Draw(self.img)
        self.font, self.title_font = _font(13 * self.s), _font(16 * self.s)

    def u(self, v: float) -> float:
        """Output pixels -> canvas pixels."""
        return v * self.s

    def text_size(self, text: str, title: bool = False) -> tuple[int, int]:
        return _text_size(self.draw, text, self.title_font if title else self.font)

    def text(self, xy: tuple[float, float], text: str, title: bool = False) -> None:
        self.draw.text(xy, text, fill="black", font=self.title_font if title else self.font)

    def vertical_text(self, text: str, x: float, cy: float) -> None:
        """`text` rotated 90° (reading bottom-up), left edge at x, centred on cy."""
        w, h = self.text_size(text)
        tile = Image.new("RGB", (w + int(self.u(4)), h + int(self.u(6))), "white")
        ImageDraw.Draw(tile).text((self.u(2), 0), text, fill="black", font=self.font)
        tile = tile.rotate(90, expand=True)
        self.img.paste(tile, (int(x), int(cy - tile.height / 2)))

    def dashed_vline(self, x: float, top: float, bottom: float) -> None:
        y, dash, gap = top, self.u(6), self.u(5)
        while y < bottom:
            self.draw.line([(x, y), (x, min(y + dash, bottom))], fill=(150, 150, 150), width=int(self.u(1)))
            y += dash + gap

    def save(self, path: Path) -> Path:
        picture = self.img.resize(self.size, Image.LANCZOS)
        store.write_atomically(path, lambda fh: picture.save(fh, format="PNG"))
        return path


def _fit_labels(cv: _Canvas, labels: list[str]) -> list[str]:
    """Legend labels cut from the left (layer names keep their informative tail) to ≤ 1/3 of the width."""
    room = cv.img.size[0] / 3 - cv.u(46)
    fitted = []
    for label in labels:
        cut = label
        while len(cut) > 4 and cv.text_size(cut)[0] > room:
            label = label[1:]
            cut = "..." + label
        fitted.append(cut)
    return fitted


@dataclass
class _Legend:
    """Where the legend goes: a column right of the plot, or (when its entries would not fit that
    column's height) `columns` columns under the x-axis label."""

    labels: list[str]
    dashed: int  # entries at the end drawn as a dashed grey line (the vertical lines' entry)
    row: float  # height of one entry
    entry_w: float  # width of one entry (swatch + text)
    below: bool = False
    columns: int = 1

    @property
    def rows(self) -> int:
        return math.ceil(len(self.labels) / self.columns)

    @property
    def height(self) -> float:
        return self.rows * self.row + self.row / 2


def _legend(cv: _Canvas, labels: list[str], dashed: int, plot_height: float) -> _Legend | None:
    if not labels:
        return None
    row = _line_height(cv.font) + cv.u(6)
    leg = _Legend(labels, dashed, row, max(cv.text_size(t)[0] for t in labels) + cv.u(46))
    if leg.height > plot_height:  # too tall for the side: under the plot, in as many columns as fit
        leg.below = True
        leg.columns = max(1, min(len(labels), int((cv.img.size[0] - cv.u(24)) // (leg.entry_w + cv.u(12)))))
    return leg


def _layout(cv: _Canvas, legend: _Legend | None, yticks: list[float], title: str, limits: tuple[float, ...]) -> _Frame:
    """Margins for the title, tick labels, axis labels and the legend (right of the plot or below)."""
    W, H = cv.img.size
    side = legend.entry_w if legend is not None and not legend.below else 0
    under = legend.height + cv.u(8) if legend is not None and legend.below else 0
    ytick_w = max(cv.text_size(_tick_label(t))[0] for t in yticks)
    line_h = cv.text_size("Hg0")[1]
    left = cv.u(12) + line_h + cv.u(8) + ytick_w + cv.u(8)
    right = W - cv.u(15) - side
    top = cv.u(16) + cv.text_size(title or "H", title=True)[1] + cv.u(14)
    bottom = H - (line_h * 2 + cv.u(24)) - under
    return _Frame(left, top, right, bottom, *limits)


def _draw_axes(cv: _Canvas, fr: _Frame, xticks: list[float], yticks: list[float], vlines: Sequence[float]) -> None:
    d, tick = cv.draw, cv.u(4)
    for t in yticks:
        y = fr.py(t)
        d.line([(fr.left, y), (fr.right, y)], fill=(235, 235, 235), width=int(cv.u(1)))
        d.line([(fr.left - tick, y), (fr.left, y)], fill="black", width=int(cv.u(1)))
        label = _tick_label(t)
        tw, th = cv.text_size(label)
        cv.text((fr.left - 2 * tick - tw, y - th / 2 - cv.u(2)), label)
    for t in xticks:
        x = fr.px(t)
        d.line([(x, fr.top), (x, fr.bottom)], fill=(235, 235, 235), width=int(cv.u(1)))
        d.line([(x, fr.bottom), (x, fr.bottom + tick)], fill="black", width=int(cv.u(1)))
        label = _tick_label(t)
        cv.text((x - cv.text_size(label)[0] / 2, fr.bottom + cv.u(7)), label)
    for v in vlines:
        if math.isfinite(v) and fr.x0 <= v <= fr.x1:
            cv.dashed_vline(fr.px(v), fr.top, fr.bottom)
    d.rectangle([fr.left, fr.top, fr.right, fr.bottom], outline="black", width=int(cv.u(1)))


def _draw_series(cv: _Canvas, fr: _Frame, series: Sequence[Series]) -> None:
    """Polylines between NaNs; an isolated point gets a dot so it does not vanish."""
    for i, (_, xs, ys) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        for run in _runs(xs, ys):
            points = [(fr.px(x), fr.py(y)) for x, y in run]
            if len(points) == 1:
                (cx, cy), r = points[0], cv.u(3)
                cv.draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            else:
                cv.draw.line(points, fill=colour, width=int(cv.u(2)), joint="curve")


def _draw_legend(cv: _Canvas, fr: _Frame, leg: _Legend) -> None:
    line_h = _line_height(cv.font)
    if leg.below:
        width = leg.columns * leg.entry_w + cv.u(8)
        lx, ly = max(cv.u(4), (fr.left + fr.right) / 2 - width / 2), cv.img.size[1] - leg.height - cv.u(6)
    else:
        lx, ly, width = fr.right + cv.u(12), fr.top, cv.img.size[0] - cv.u(4) - (fr.right + cv.u(12))
    cv.draw.rectangle([lx, ly, lx + width, ly + leg.height], outline=(120, 120, 120), fill="white",
                      width=int(cv.u(1)))
    first_dashed = len(leg.labels) - leg.dashed
    for i, label in enumerate(leg.labels):
        col, r = divmod(i, leg.rows)
        x = lx + cv.u(4) + col * leg.entry_w
        y = ly + leg.row / 4 + r * leg.row + leg.row / 2
        if i >= first_dashed:
            for a in range(0, 22, 8):  # a short dashed segment, as the vertical lines are drawn
                cv.draw.line([(x + cv.u(2 + a), y), (x + cv.u(min(2 + a + 5, 24)), y)], fill=(150, 150, 150),
                             width=int(cv.u(1)))
        else:
            cv.draw.line([(x + cv.u(2), y), (x + cv.u(24), y)], fill=PALETTE[i % len(PALETTE)], width=int(cv.u(3)))
        cv.text((x + cv.u(30), y - line_h / 2), label)


def line_plot(series: Sequence[Series], path: Path, title: str, xlabel: str, ylabel: str,
              vlines: Sequence[float] = (), size: tuple[int, int] = (800, 500), vline_label: str = "") -> Path:
    """Draw (label, xs, ys) series as coloured polylines with axes, ticks, a legend and dashed
    vertical lines at `vlines` (named in the legend by `vline_label`). The legend stands right of
    the plot, or under it in columns when it has too many entries for that."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x0, x1, xticks = _axis([float(v) for _, xs, _ in series for v in xs] + [float(v) for v in vlines])
    y0, y1, yticks = _axis([float(v) for _, _, ys in series for v in ys])
    cv = _Canvas(size)
    labels = _fit_labels(cv, [label for label, _, _ in series])
    dashed = 1 if vline_label and vlines else 0
    if dashed:
        labels.append(vline_label)
    bare = _layout(cv, None, yticks, title, (x0, x1, y0, y1))
    legend = _legend(cv, labels, dashed, bare.bottom - bare.top)
    fr = _layout(cv, legend, yticks, title, (x0, x1, y0, y1))

    _draw_axes(cv, fr, xticks, yticks, vlines)
    _draw_series(cv, fr, series)
    line_h = cv.text_size("Hg0")[1]
    cv.text(((fr.left + fr.right) / 2 - cv.text_size(xlabel)[0] / 2, fr.bottom + line_h + cv.u(14)), xlabel)
    if ylabel:
        cv.vertical_text(ylabel, cv.u(8), (fr.top + fr.bottom) / 2)
    cv.text((max(cv.u(4), cv.img.size[0] / 2 - cv.text_size(title, title=True)[0] / 2), cv.u(12)), title, title=True)
    if legend is not None:
        _draw_legend(cv, fr, legend)
    return cv.save(path)


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

    meta: store.DatasetMeta | None = None
    # picture suffix, the synset, whether the picture shows its best images
    synsets: list[tuple[str, store.Synset, bool]] = dataclasses.field(default_factory=list)
    convex: _Convex | None = None
    accuracy: np.ndarray | None = None  # [E_done, K+1] stored test accuracy of done experts
    done: np.ndarray | None = None  # indices of the done experts (rows of `accuracy`)


def _read_contents(path: Path) -> _Contents:
    """The parts of the artifact the pictures show (each read through the store's checks)."""
    c = _Contents()
    with store.open_artifact(path) as f:
        has_synsets, has_buffer = bool(store.synset_names(f)), "experts" in f or "convex" in f
    if has_synsets:
        with store.open_synsets(path) as sf:
            c.meta = sf.data
            syn = sf.read(sf.pick(None))
            c.synsets.append(("synset", syn, False))
            if syn.best is not None:
                c.synsets.append(("synset-best", syn, True))
    if has_buffer:
        with store.open_buffer(path) as buf:
            c.meta = buf.data
            if buf.experts is not None and buf.experts.done.any():
                c.accuracy, c.done = buf.accuracy(), buf.experts.done_indices
            if buf.convex_state == "complete" and buf.convex.done.any():
                e = int(buf.convex_experts()[0])
                waypoints, beta = buf.convex_expert(e)
                c.convex = _Convex(e, list(buf.convex.meta.positions), waypoints, beta, buf.spec, buf.layout)
    return c


class _LazyData:
    """The artifact's dataset, loaded at most once and only if a picture needs it."""

    def __init__(self, meta: store.DatasetMeta | None, data_dir: Path | None, device: torch.device) -> None:
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


def _evenly(items: list[int], n: int) -> list[int]:
    """n evenly spaced entries of items, always including the first and the last."""
    if len(items) <= n:
        return items
    return [items[i] for i in sorted({int(round(v)) for v in np.linspace(0, len(items) - 1, n)})]


def layer_picks(names: list[str]) -> tuple[list[int], str]:
    """The layers to draw (all when ≤ MAX_CURVES) and how they were chosen, for the title."""
    if len(names) <= MAX_CURVES:
        return list(range(len(names))), ""
    # Weights move the network; biases mostly mirror them, so the weights are shown first.
    weights = [j for j, n in enumerate(names) if n.endswith("weight")]
    if 0 < len(weights) <= MAX_CURVES:
        return weights, f"the {len(weights)} weight tensors of {len(names)} layers"
    if len(weights) > MAX_CURVES:
        return _evenly(weights, MAX_CURVES), f"{MAX_CURVES} of {len(weights)} weight tensors, evenly spaced"
    picks = _evenly(list(range(len(names))), MAX_CURVES)
    return picks, f"{len(picks)} of {len(names)} layers, evenly spaced"


def beta_plot(cv: _Convex, path: Path) -> Path:
    """β (global position along the waypoints) of each layer against the epoch."""
    beta = cv.beta.double().numpy()
    epochs = list(range(beta.shape[0]))
    names = [n for n, _ in cv.layout]
    names += [f"layer {j}" for j in range(len(names), beta.shape[1])]  # a layout shorter than β: still plot
    picks, how = layer_picks(names[: beta.shape[1]])
    series = [(names[j], epochs, beta[:, j].tolist()) for j in picks]
    title = f"beta per layer, expert {cv.expert}" + (f" ({how})" if how else "")
    return line_plot(series, path, title, "epoch", "beta (waypoint index + fraction of segment)",
                     vlines=[float(p) for p in cv.positions], vline_label=WAYPOINTS_LABEL)


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


def _test_subset(x: torch.Tensor, y: torch.Tensor, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """At most `limit` test images (None: all on an accelerator, CPU_TEST_IMAGES on CPU).

    Strided, not the first ones: folder datasets store their test split class by class."""
    if limit is None:
        limit = CPU_TEST_IMAGES if x.device.type == "cpu" else x.shape[0]
    if limit <= 0 or x.shape[0] <= limit:
        return x, y
    stride = math.ceil(x.shape[0] / limit)
    return x[::stride], y[::stride]


def accuracy_plot(c: _Contents, data: _LazyData | None, path: Path, test_images: int | None = None,
                  reporter: Reporter = SILENT) -> Path:
    """Stored mean expert accuracy per epoch, plus the first convexified expert raw vs convexified
    (the latter evaluated on the test split; `data` None skips it)."""
    assert c.accuracy is not None and c.done is not None
    epochs = list(range(c.accuracy.shape[1]))
    series: list[Series] = [("expert (stored)", epochs, [100 * v for v in _column_mean(c.accuracy)])]
    vlines: list[float] = []
    cv = c.convex
    if cv is not None and cv.beta.shape[0] == len(epochs):
        vlines = [float(p) for p in cv.positions]
        rows = np.flatnonzero(c.done == cv.expert)
        if rows.size and len(c.done) == 1:
            series = []  # the "mean" of one expert is that expert's own curve: draw it once
        if rows.size:
            series.append((f"expert {cv.expert} trajectory", epochs, (100 * c.accuracy[rows[0]]).tolist()))
        prepared = data.get() if data is not None else None
        if prepared is not None:
            traj = ConvexTrajectory(cv.waypoints, cv.beta, cv.positions, layer_sizes(cv.layout))
            if test_images is None and sum(layer_sizes(cv.layout)) <= SMALL_MODEL_PARAMS:
                test_images = 0  # all of them
            x, y = _test_subset(prepared.test_x, prepared.test_y, test_images)
            reporter.log(f"evaluating expert {cv.expert}'s convexified path at {len(epochs)} epochs on "
                         f"{x.shape[0]} test images for the accuracy plot (--no-evaluate skips it)")
            acc = convexified_accuracy(cv.spec, traj, x, y)
            note = ("" if x.shape[0] == prepared.test_x.shape[0]
                    else f" ({x.shape[0]} test images; stored curves use all)")
            series.append((f"expert {cv.expert} convexified{note}", epochs, [100 * v for v in acc]))
    n = len(c.done)
    title = f"test accuracy along the trajectory ({'1 expert' if n == 1 else f'mean of {n} experts'})"
    return line_plot(series, path, title, "epoch", "test accuracy (%)", vlines=vlines,
                     vline_label=WAYPOINTS_LABEL)


def _suffixed(png: Path, what: str) -> Path:
    """out/overview.png -> out/overview-<what>.png."""
    png = Path(png)
    return png.with_name(f"{png.stem}-{what}.png")


def write_overview(file: Path, png: Path, data_dir: Path | None = None, device: torch.device | None = None,
                   test_images: int | None = None, evaluate: bool = True, reporter: Reporter = SILENT) -> list[Path]:
    """Write the pictures the artifact supports (synset grids, β curves, accuracy); their paths.

    `test_images` caps the test images the convexified path is evaluated on (None: all on an
    accelerator, CPU_TEST_IMAGES on CPU; 0: all); `evaluate=False` draws only stored curves."""
    if device is None:
        device = resolve_device("auto")
    c = _read_contents(Path(file))
    data = _LazyData(c.meta, data_dir, device)
    written: list[Path] = []
    for suffix, syn, best in c.synsets:
        prepared = data.get()
        prep = prepared.prep if prepared is not None else None
        assert c.meta is not None
        try:
            written.append(synset_picture(syn, c.meta, prep, _suffixed(png, suffix), best))
        except ValueError:  # images do not fit the dataset's preprocessing: show them min-max scaled
            written.append(synset_picture(syn, c.meta, None, _suffixed(png, suffix), best))
    if c.convex is not None:
        written.append(beta_plot(c.convex, _suffixed(png, "beta")))
    if c.accuracy is not None:
        written.append(accuracy_plot(c, data if evaluate else None, _suffixed(png, "accuracy"), test_images, reporter))
    return written
