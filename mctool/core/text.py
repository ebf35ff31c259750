"""Text that reaches a terminal, a message or a picture: torch- and h5py-free, so that the
command line's parsing and rendering import nothing heavy."""

from __future__ import annotations

import unicodedata


def clean_text(text: str) -> str:
    """`text` without control characters (escape sequences, bells, OSC): every string read
    from a file passes here before it reaches a terminal, a message or a picture."""
    return "".join("?" if unicodedata.category(ch) in ("Cc", "Cf") and ch != "\t" else ch for ch in text)


def count(n: int | float, noun: str) -> str:
    """`n` and `noun`, plural unless `n` is 1: "1 epoch", "2 epochs", "0.5 epochs"."""
    return f"{n:g} {noun}" + ("" if n == 1 else "s")
