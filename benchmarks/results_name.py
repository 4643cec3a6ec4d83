"""``--name`` of the benchmark scripts: the file stem their CSV and plots are written under."""

from __future__ import annotations

import argparse
import re

_STEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def file_stem(text: str) -> str:
    """argparse ``type``: ``text`` if it is a plain file stem (no folder, no leading dot)."""
    if not _STEM.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"must be a plain file stem (letters, digits, _ . -), got {text!r}"
        )
    return text
