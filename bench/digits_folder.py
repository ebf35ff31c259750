"""Write scikit-learn's 1,797 handwritten digits (real 8×8 scans) as a class-folder dataset.

A real-image dataset mctool has never seen, used through `folder:PATH` by the tuning
measurements in bench/README.md ("A dataset nobody tuned"). Needs scikit-learn, which ships
the digits with the package (no download): `pip install scikit-learn` — for this script only,
mctool does not depend on it.

    python bench/digits_folder.py OUT_DIR [--test 0.25] [--seed 0]

Writes OUT_DIR/train/<digit>/<n>.png and OUT_DIR/test/<digit>/<n>.png: 8-bit greyscale PNGs
(the 0…16 scan levels scaled to 0…255), a class-balanced random test share.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    """Write the folders; print how many images went where."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--test", type=float, default=0.25, help="share of each class written to test/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("error: needs scikit-learn (pip install scikit-learn); mctool itself does not") from None
    from PIL import Image

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target
    rng = np.random.default_rng(args.seed)
    counts = {"train": 0, "test": 0}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(args.test * idx.size))
        for split, part in (("test", idx[:n_test]), ("train", idx[n_test:])):
            folder = args.out / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
            counts[split] += part.size
    print(f"{args.out}: {counts['train']} training and {counts['test']} test images, 10 classes, 8x8 greyscale")


if __name__ == "__main__":
    main()
