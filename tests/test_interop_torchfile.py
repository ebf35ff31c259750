"""The restricted torch-file reader: exact tensors, no code run, damage reported in one line, bounded reads."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from mctool.interop.torchfile import (
    TensorRef, TorchFileError, UnsafeTorchFile, check_tensors_in_lists, open_torch_file,
)


class _RunsCode:
    """Unpickling this runs exec(...), which creates the sentinel file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (exec, (f"open({str(self.sentinel)!r}, 'w').close()",))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    return text


def test_reads_every_tensor_bit_for_bit(tmp_path: Path) -> None:
    base = torch.randn(6, 5)
    obj = [
        [torch.randn(3, 4), torch.tensor(0.25), base[:, 1:3], base.t(), base[2]],  # views and transposes
        (torch.arange(7, dtype=torch.int64), torch.randn(2, 2, dtype=torch.float16), torch.empty(0, 3)),
        [[torch.nn.Parameter(torch.randn(2))]],
    ]
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with open_torch_file(path) as tf:
        assert tf.streaming
        flat_expected = [obj[0][0], obj[0][1], obj[0][2], obj[0][3], obj[0][4], *obj[1], obj[2][0][0].detach()]
        flat_refs = [*tf.root[0], *tf.root[1], tf.root[2][0][0]]
        assert all(isinstance(r, TensorRef) for r in flat_refs)
        for ref, want in zip(flat_refs, flat_expected):
            got = tf.read(ref)
            assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
            assert torch.equal(got, want)
        # Views of one storage are recognisably the same memory.
        assert tf.root[0][2].storage_id == tf.root[0][3].storage_id != tf.root[0][0].storage_id


@pytest.mark.parametrize("legacy", [False, True])
def test_code_in_a_pickle_is_refused_and_never_run(tmp_path: Path, legacy: bool) -> None:
    sentinel = tmp_path / "ran.txt"
    path = tmp_path / "evil.pt"
    torch.save([[[torch.zeros(2), _RunsCode(sentinel)]]], path, _use_new_zipfile_serialization=not legacy)
    # The fixture is live: an unrestricted load (in a child process) does run its code.
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                   check=False, capture_output=True)
    assert sentinel.exists()
    sentinel.unlink()

    with pytest.raises(UnsafeTorchFile) as err:
        open_torch_file(path)
    msg = _one_line(err.value)
    assert str(path) in msg and "exec" in msg and "nothing from the file was run" in msg
    assert not sentinel.exists()


def test_only_tensors_in_lists(tmp_path: Path) -> None:
    for name, obj, word in (("dict.pt", {"w": torch.zeros(1)}, "dict"), ("ints.pt", [[1, 2]], "int"),
                            ("str.pt", ["x"], "str")):
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(UnsafeTorchFile) as err:
            open_torch_file(path)
        assert word in _one_line(err.value) and str(path) in str(err.value)
    check_tensors_in_lists([[], ()], tmp_path)  # empty lists are fine


def test_truncated_damaged_and_foreign_files(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save([[torch.randn(64, 64), torch.randn(64)]], good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFileError) as err:
        open_torch_file(truncated)
    assert "truncated" in _one_line(err.value) and str(truncated) in str(err.value)

    # One flipped byte in the first storage's data: opening succeeds, reading fails its CRC.
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    header = data[info.header_offset: info.header_offset + 30]
    offset = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
    flipped = bytearray(data)
    flipped[offset + 10] ^= 0xFF
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(flipped))
    with open_torch_file(damaged) as tf:
        with pytest.raises(TorchFileError) as err:
            tf.read(tf.root[0][0])
    assert "damaged" in _one_line(err.value) and str(damaged) in str(err.value)

    # A storage whose bytes do not match its description.
    short = tmp_path / "short.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(short, "w") as dst:
        for item in src.infolist():
            payload = src.read(item)
            dst.writestr(item.filename, payload[:-4] if item.filename.endswith("data/1") else payload)
    with pytest.raises(TorchFileError) as err:
        open_torch_file(short)
    assert "storage 1" in _one_line(err.value)

    for name, payload in (("empty.pt", b""), ("text.pt", b"hello world"), ("zip.pt", None)):
        path = tmp_path / name
        if payload is None:
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("readme.txt", "not torch")
        else:
            path.write_bytes(payload)
        with pytest.raises(TorchFileError) as err:
            open_torch_file(path)
        _one_line(err.value)
    with pytest.raises(TorchFileError):
        open_torch_file(tmp_path / "missing.pt")


def test_legacy_files_are_read_whole_and_exactly(tmp_path: Path) -> None:
    obj = [[[torch.randn(3, 3), torch.randn(3)] for _ in range(3)]]
    path = tmp_path / "old.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    with open_torch_file(path) as tf:
        assert not tf.streaming
        assert torch.equal(tf.read(tf.root[0][2][0]), obj[0][2][0])


def test_reads_are_bounded_by_the_tensors_read(tmp_path: Path) -> None:
    """Reading one snapshot touches that snapshot's bytes, not the file's."""
    experts = [[[torch.randn(128, 128) for _ in range(2)] for _ in range(6)] for _ in range(3)]
    path = tmp_path / "big.pt"
    torch.save(experts, path)
    size = path.stat().st_size
    snapshot_bytes = 2 * 128 * 128 * 4
    with open_torch_file(path) as tf:
        opened = tf.bytes_read
        assert opened < size / 20  # the pickle and the directory only
        for leaf in tf.root[1][3]:
            tf.read(leaf)
        # One snapshot plus zip headers (a few hundred bytes per member).
        assert tf.bytes_read - opened < snapshot_bytes + 4096
        for snap in tf.root[2]:
            for leaf in snap:
                tf.read(leaf)
        assert tf.bytes_read - opened < 7 * snapshot_bytes + 8 * 4096 < size


# --------------------------------------------------------------------------- issue 24: bounded walks and reads


def _dag(levels: int) -> list:
    node: list = [torch.zeros(2)]
    for _ in range(levels):
        node = [node, node]
    return node


@pytest.mark.parametrize("legacy", [False, True])
def test_structures_that_never_end_are_refused_at_once(tmp_path: Path, legacy: bool) -> None:
    import time

    from mctool.interop import torchfile

    selfref: list = [torch.zeros(2)]
    selfref.append(selfref)
    cases = {"self": (selfref, "contains itself"), "deep": (_dag(60), "lists deep"),
             # Within the depth limit, but 2^15 paths through shared lists of 2^15-ish nodes each way:
             # counted without walking every path, refused for its size.
             "wide": ([_dag(torchfile.MAX_DEPTH - 2)] * 100, "more than")}
    for name, (obj, says) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        started = time.perf_counter()
        with pytest.raises(TorchFileError, match=says) as info:
            open_torch_file(path)
        assert time.perf_counter() - started < 5, name
        _one_line(info.value)
    # A shared list below the limits is read (each path sees the same tensors).
    path = tmp_path / "shared.pt"
    torch.save(_dag(4), path, _use_new_zipfile_serialization=not legacy)
    with open_torch_file(path) as tf:
        leaf = tf.root[1][0][1][0][0]
        assert torch.equal(tf.read(leaf), torch.zeros(2))


def test_a_slice_of_a_huge_deflated_storage_reads_only_the_slice(tmp_path: Path) -> None:
    from tests import torchzip as tz

    big = tz.Storage("0", (256 << 20) // 4, deflate=True)  # 256 MiB of zeros, deflated to ~1 MB
    values = tz.tensor(torch.arange(6.0), "1")
    root = [[tz.Tensor(big, (3, 4), offset=5), values, tz.Tensor(values.storage, (2,), offset=3)]]
    path = tz.write(tmp_path / "slice.pt", root)
    with open_torch_file(path) as tf:
        opened = tf.bytes_read
        assert torch.equal(tf.read(tf.root[0][0]), torch.zeros(3, 4))
        assert tf.bytes_read - opened < 64 << 10  # the first few KB of the deflated stream, not 256 MiB
        assert torch.equal(tf.read(tf.root[0][1]), torch.arange(6.0))
        assert torch.equal(tf.read(tf.root[0][2]), torch.tensor([3.0, 4.0]))


def test_what_a_read_would_allocate_is_checked_when_the_file_opens(tmp_path: Path, monkeypatch) -> None:
    from mctool.interop import torchfile
    from tests import torchzip as tz

    one = tz.Storage("0", 1, data=torch.tensor([1.0]).numpy().tobytes())
    path = tz.write(tmp_path / "wide.pt", [[tz.Tensor(one, (100000, 100000, 3, 3), (0, 0, 0, 0))]])
    assert path.stat().st_size < 2000
    with pytest.raises(TorchFileError, match="would take 360.0 GB to read") as info:
        open_torch_file(path)
    _one_line(info.value)
    monkeypatch.setattr(torchfile, "memory_limit", lambda: 1000)
    small = tmp_path / "small.pt"
    torch.save([torch.zeros(300)], small)
    with pytest.raises(TorchFileError, match="would take 1,200 bytes to read, more than the 1,000 bytes"):
        open_torch_file(small)


def test_spans_and_self_overlap() -> None:
    from mctool.interop.torchfile import LoadedTensor, StorageRef

    st = StorageRef("0", torch.float32, 100)
    assert TensorRef(st, 10, (2, 3), (3, 1)).span() == (40, 40 + 6 * 4)
    assert TensorRef(st, 0, (4, 5), (1, 4)).span() == (0, 20 * 4)  # a transpose
    assert not TensorRef(st, 0, (4, 5), (1, 4)).overlaps_itself()
    assert TensorRef(st, 0, (4, 5), (0, 1)).overlaps_itself()
    assert TensorRef(st, 0, (4, 5), (2, 1)).overlaps_itself()  # rows overlap by 3
    assert not TensorRef(st, 0, (4, 1), (1, 0)).overlaps_itself()  # a size-1 dimension's stride is free
    base = torch.arange(20.0)
    assert LoadedTensor(base[4:10]).span() == (16, 40)
    assert LoadedTensor(base.expand(3, 20)).overlaps_itself()


def test_a_legacy_file_declaring_a_huge_storage_is_refused_before_torch_allocates_it(tmp_path: Path) -> None:
    """torch.load allocates a legacy storage at its declared size before reading it: the declared
    sizes are checked against the file first (2^31 − 1 floats, 8.6 GB, in a file of 400 bytes)."""
    import io

    buf = io.BytesIO()
    torch.save([torch.zeros(5)], buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    at = data.index(b"cpuq\x05K\x05N") + len(b"cpuq\x05")
    path = tmp_path / "huge.pt"
    path.write_bytes(data[:at] + b"J\xff\xff\xff\x7f" + data[at + 2:])
    with pytest.raises(TorchFileError, match="its storages declare 8,589,934,596 bytes, the file holds 28") as info:
        open_torch_file(path)
    _one_line(info.value)
