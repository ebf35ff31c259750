"""Write real Fashion-MNIST images as a class-folder dataset (for `folder:PATH`).

Used by bench/README.md's "A dataset nobody tuned" to try mctool on a class-folder dataset of
real photographs of clothing, as a user's own images would arrive: PNG files in one folder per
class, no preset, no IDX files. Reads the four IDX files of Debian's `dataset-fashion-mnist`
(or any folder that holds them):

    python bench/fmnist_folder.py OUT_DIR [--train-per-class 1000] [--test-per-class 1000] \
        [--source /usr/share/datasets/fashion-mnist] [--seed 0] [--size 28]

Writes OUT_DIR/train/<class name>/<index>.png and OUT_DIR/test/<class name>/<index>.png
(8-bit greyscale 28×28, exactly the IDX bytes), a class-balanced random subset of each split.
`--size S` shrinks every image to S×S by averaging (PIL's box filter): the same photographs at an
image size no preset or Table A entry has (e.g. 14 or 8, to check the lr_img size rule's guess).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) as a uint8 array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:3] != b"\x00\x00\x08":
        raise SystemExit(f"error: {path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main() -> None:
    """Write the folders; print how many images went where."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=1000)
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=28, help="side of the written images (box-filtered from 28)")
    args = parser.parse_args()
    if not 1 <= args.size <= 28:
        raise SystemExit("error: --size must be between 1 and 28")
    from PIL import Image  # Pillow comes with torchvision

    rng = np.random.default_rng(args.seed)
    counts = {}
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("test", "t10k", args.test_per_class)):
        images = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")
        counts[split] = 0
        for c, name in enumerate(CLASSES):
            chosen = rng.permutation(np.flatnonzero(labels == c))[:per_class]
            folder = args.out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                image = Image.fromarray(images[i], mode="L")
                if args.size != 28:
                    image = image.resize((args.size, args.size), Image.Resampling.BOX)
                image.save(folder / f"{i:05d}.png")
            counts[split] += chosen.size
    side = args.size
    print(f"{args.out}: {counts['train']} training and {counts['test']} test images, 10 classes, {side}x{side} greyscale")


if __name__ == "__main__":
    main()
