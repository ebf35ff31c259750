"""Hand-made torch.save zip files: any structure, storage sizes, strides and compression.

A file torch.save itself would never write (a storage of 2 GiB deflated to 2 MB, stride-0
tensors describing a huge ConvNet in 5 KB, a list inside itself) is written here from a
description, with the same pickle opcodes torch uses (the real torch globals, persistent
storage ids), so the reader sees exactly what a hostile file would show it.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_STORAGE_CLASS = {torch.float32: "FloatStorage", torch.float64: "DoubleStorage", torch.float16: "HalfStorage",
                  torch.int64: "LongStorage", torch.uint8: "ByteStorage"}


@dataclass(eq=False)
class Storage:
    """Storage `key` of `numel` elements; `data` its bytes, or None for zeros (streamed)."""

    key: str
    numel: int
    dtype: torch.dtype = torch.float32
    data: bytes | None = None
    deflate: bool = False

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty(0, dtype=self.dtype).element_size()


@dataclass(eq=False)
class Tensor:
    """A view of a Storage."""

    storage: Storage
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None  # None: contiguous
    offset: int = 0

    def strides(self) -> tuple[int, ...]:
        if self.stride is not None:
            return self.stride
        out, acc = [], 1
        for s in reversed(self.shape):
            out.append(acc)
            acc *= s
        return tuple(reversed(out))


def tensor(values: torch.Tensor, key: str, deflate: bool = False) -> Tensor:
    """A Tensor (own storage) holding `values`."""
    v = values.contiguous()
    st = Storage(key, v.numel(), v.dtype, v.numpy().tobytes(), deflate)
    return Tensor(st, tuple(v.shape))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Storage):
            return ("storage", getattr(torch, _STORAGE_CLASS[obj.dtype]), obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, Tensor):
            return (torch._utils._rebuild_tensor_v2,
                    (obj.storage, obj.offset, obj.shape, obj.strides(), False, collections.OrderedDict()))
        return NotImplemented


def _storages(root: Any) -> dict[str, Storage]:
    found: dict[str, Storage] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, Tensor):
            found[node.storage.key] = node.storage
        elif isinstance(node, (list, tuple)) and id(node) not in seen:
            seen.add(id(node))
            stack.extend(node)
    return found


def _zeros(n: int, chunk: int = 1 << 24) -> Iterator[bytes]:
    block = bytes(chunk)
    while n > 0:
        yield block[: min(n, chunk)]
        n -= chunk


def pickle_bytes(root: Any) -> bytes:
    """data.pkl of `root` (lists/tuples of Tensor)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(root)
    return buf.getvalue()


def write(path: Path, root: Any, pkl: bytes | None = None, name: str = "archive") -> Path:
    """A torch.save-style zip of `root` (or of the given data.pkl bytes, with `root`'s storages)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/data.pkl", pkl if pkl is not None else pickle_bytes(root))
        zf.writestr(f"{name}/byteorder", "little")
        for st in _storages(root).values():
            info = zipfile.ZipInfo(f"{name}/data/{st.key}")
            info.compress_type = zipfile.ZIP_DEFLATED if st.deflate else zipfile.ZIP_STORED
            if st.deflate:
                info._compresslevel = 1  # fast: gigabytes of zeros
            with zf.open(info, "w", force_zip64=st.nbytes > (1 << 31) - 1) as out:
                for block in ([st.data] if st.data is not None else _zeros(st.nbytes)):
                    out.write(block)
        zf.writestr(f"{name}/version", "3\n")
    return path


@dataclass
class Net:
    """Parameter shapes of a ConvNet (depth blocks of conv weight/bias + norm weight/bias, then a
    linear classifier) on MNIST-format images (28 px padded to 32)."""

    width: int
    depth: int = 3
    channels: int = 1
    classes: int = 10
    shapes: list[tuple[int, ...]] = field(init=False)

    def __post_init__(self) -> None:
        shapes: list[tuple[int, ...]] = []
        for b in range(self.depth):
            shapes += [(self.width, self.channels if b == 0 else self.width, 3, 3), (self.width,), (self.width,),
                       (self.width,)]
        feat = self.width * (32 >> self.depth) ** 2
        self.shapes = shapes + [(self.classes, feat), (self.classes,)]


def stride0_experts(net: Net, experts: int = 1, snapshots: int = 3) -> list:
    """Experts whose every parameter tensor is one stored float broadcast (stride 0): a tiny file
    describing a network of any width."""
    value = torch.tensor([0.5]).numpy().tobytes()
    out = []
    for e in range(experts):
        snaps = []
        for k in range(snapshots):
            snaps.append([Tensor(Storage(f"{e}_{k}_{i}", 1, data=value), s, tuple(0 for _ in s))
                          for i, s in enumerate(net.shapes)])
        out.append(snaps)
    return out
