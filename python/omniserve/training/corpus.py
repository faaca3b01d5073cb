"""The training corpus: the Python standard library's own source, split by a stable hash of the path.

The stdlib source is present on every machine with Python, offline, and free to use (PSF licence).
Its exact file list differs between interpreter versions, so nothing depends on the list: files are
ordered and held out by a SHA-1 of their path relative to the stdlib directory, which gives the same
decision for a file on any machine and any version that has it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Third-party packages and build artefacts live under the stdlib directory but are not the stdlib.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload"})


def stdlib_dir() -> Path:
    return Path(os.path.dirname(os.__file__))


@dataclass(frozen=True)
class SourceFile:
    rel_path: str  # POSIX path relative to the corpus root: the identity that is hashed
    text: str

    @property
    def digest(self) -> int:
        return int.from_bytes(hashlib.sha1(self.rel_path.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Corpus:
    root: Path
    train: list[SourceFile]
    held_out: list[SourceFile]

    @property
    def train_bytes(self) -> int:
        return sum(len(f.text.encode()) for f in self.train)

    @property
    def held_out_bytes(self) -> int:
        return sum(len(f.text.encode()) for f in self.held_out)


def load_corpus(root: Path, max_bytes: int, held_out_percent: int) -> Corpus:
    """Every UTF-8 `.py` file under `root` (minus third-party dirs), in hash order, up to `max_bytes`.

    Hash order (not path order) makes a capped corpus a uniform sample of the library rather than
    its alphabetical beginning. Files that are not valid UTF-8 (a few encoding tests) are skipped.
    """
    files: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                files.append(SourceFile(path.relative_to(root).as_posix(), text))
    files.sort(key=lambda f: (f.digest, f.rel_path))
    kept, total = [], 0
    for f in files:
        size = len(f.text.encode())
        if total + size > max_bytes:
            break
        kept.append(f)
        total += size
    held = [f for f in kept if f.digest % 100 < held_out_percent]
    train = [f for f in kept if f.digest % 100 >= held_out_percent]
    if not train or not held:
        raise ValueError(f"corpus under {root} too small to split: {len(train)} train / {len(held)} held-out files")
    return Corpus(root, train, held)


class TokenStream:
    """All files of one split as one token array: `<s> file </s> <s> file </s> ...`.

    Training rows are random crops of it; held-out evaluation reads it in consecutive windows.
    """

    def __init__(self, ids: np.ndarray, special_ids: tuple[int, ...]) -> None:
        self.ids = ids
        self._special = np.asarray(special_ids, dtype=ids.dtype)

    def __len__(self) -> int:
        return len(self.ids)

    def crops(self, rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
        starts = rng.integers(0, len(self.ids) - length, size=rows)
        return np.stack([self.ids[s : s + length] for s in starts])

    def text_crop(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """A crop without special tokens, for code used as filler inside a passkey document."""
        start = int(rng.integers(0, len(self.ids) - 2 * length))
        window = self.ids[start : start + 2 * length]  # slack for the specials dropped below
        return window[~np.isin(window, self._special)][:length]
