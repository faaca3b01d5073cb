"""The training corpus: Python source that is offline on every machine and free to use.

Two sources, in this order: the interpreter's standard library (PSF licence), whole, then the `.py`
files of installed distributions whose metadata declares a permissive licence, until a byte budget
is full. The stdlib alone (~10 MB, ~3M tokens without its test suite) is far too little for a
full training run: a model trained on it alone saw it dozens of times and memorised it (its
held-out loss rose while the training loss kept falling).

Files are identified by their path relative to their source's root (`json/decoder.py`,
`site-packages/numpy/linalg/_linalg.py`), and both the held-out split and the order in which the
budget is filled follow a SHA-1 of that path: the same decision for a file on any machine and any
version that has it, and a capped package corpus is a uniform sample of all packages rather than
the alphabetical beginning of the first ones.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STDLIB = "stdlib"
# Third-party packages and build artefacts live under the stdlib directory but are not the stdlib.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload"})
# Code copied into a distribution from other projects keeps those projects' licences, which the
# distribution's metadata does not declare: left out.
_VENDORED_DIRS = frozenset(
    {
        "_vendor",
        "vendor",
        "_vendored",
        "vendored",
        "third_party",
        "_third_party",
        "thirdparty",
        "extern",
        "_extern",
    }
)
# Larger files, or files with very long lines on average, are generated tables (Unicode data, AWS
# policies, lexer maps), not code anyone writes.
MAX_FILE_BYTES = 1_000_000
MAX_MEAN_LINE_CHARS = 200

# SPDX identifiers accepted as permissive: the MIT, BSD, Apache, PSF and ISC families, plus a few
# equally permissive ones that large scientific distributions declare for bundled components
# (numpy: 0BSD, Zlib, CC0-1.0; torch: Zlib, BSL-1.0; regex: CNRI-Python) and without which they
# would be left out whole. Exceptions after WITH only add permissions, so they are not checked.
PERMISSIVE_SPDX = frozenset(
    s.lower()
    for s in (
        "MIT",
        "MIT-0",
        "MIT-CMU",
        "BSD-2-Clause",
        "BSD-3-Clause",
        "0BSD",
        "Apache-2.0",
        "PSF-2.0",
        "Python-2.0",
        "CNRI-Python",
        "ISC",
        "Zlib",
        "BSL-1.0",
        "CC0-1.0",
    )
)
# Free-text `License` fields and trove classifiers, by licence family. The not-permissive pattern is
# checked first, so "BSD or GPL" counts as not permissive.
_NOT_PERMISSIVE = re.compile(
    r"\b(?:[al]?gpl|mpl|eupl|epl|cddl|sspl|busl|cc-by)|mozilla|eclipse|proprietary|"
    r"general public|affero|commercial|artistic|creative commons|public domain|unlicense",
    re.IGNORECASE,
)
_FAMILIES = (
    ("MIT", re.compile(r"\bmit\b", re.IGNORECASE)),
    ("BSD", re.compile(r"bsd", re.IGNORECASE)),
    ("Apache", re.compile(r"apache|\basl ?2", re.IGNORECASE)),
    ("PSF", re.compile(r"\bpsf|python software foundation", re.IGNORECASE)),
    ("ISC", re.compile(r"\bisc\b|\biscl\b", re.IGNORECASE)),
)


def stdlib_dir() -> Path:
    return Path(os.path.dirname(os.__file__))


def path_digest(rel_path: str) -> int:
    return int.from_bytes(hashlib.sha1(rel_path.encode()).digest()[:8], "big")


@dataclass(frozen=True)
class SourceFile:
    rel_path: str  # POSIX path relative to the source root (prefixed `site-packages/` for packages)
    text: str
    source: str  # STDLIB or a distribution's name

    @property
    def digest(self) -> int:
        return path_digest(self.rel_path)


@dataclass
class Source:
    """One origin of files (the stdlib or one distribution) and what the corpus took from it."""

    name: str
    version: str
    licence: str
    files: int = 0
    bytes: int = 0

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "licence": self.licence,
            "files": self.files,
            "bytes": self.bytes,
        }


@dataclass
class Corpus:
    root: Path
    train: list[SourceFile]
    held_out: list[SourceFile]
    sources: list[Source]  # the stdlib first, then distributions with at least one file taken
    skipped: list[dict] = field(
        default_factory=list
    )  # distributions left out: name, version, reason

    @property
    def train_bytes(self) -> int:
        return sum(len(f.text.encode()) for f in self.train)

    @property
    def held_out_bytes(self) -> int:
        return sum(len(f.text.encode()) for f in self.held_out)


def permissive_licence(meta: importlib.metadata.PackageMetadata) -> str | None:
    """The licence a distribution declares, if it is permissive; None if not, or if unknown.

    `License-Expression` (PEP 639, SPDX) wins when present: every licence it names must be
    permissive (conservative for "X OR Y"). Otherwise the trove classifiers and a short `License`
    field are read; any not-permissive mention rejects, and at least one permissive family is
    needed. A multi-line `License` field is the licence's full text, which only a human should
    interpret: it is not read.
    """
    expression = (meta.get("License-Expression") or "").strip()
    if expression:
        terms = re.sub(r"\bWITH\s+\S+", " ", expression, flags=re.IGNORECASE)
        ids = {t.lower() for t in re.findall(r"[A-Za-z0-9.+-]+", terms)} - {"and", "or"}
        return expression if ids and ids <= PERMISSIVE_SPDX else None
    declarations = [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    declarations = [c for c in declarations if c != "License :: OSI Approved"]  # names no licence
    text = (meta.get("License") or "").strip()
    if text and "\n" not in text and len(text) <= 100 and text.upper() != "UNKNOWN":
        declarations.append(text)
    families = set()
    for declaration in declarations:
        if _NOT_PERMISSIVE.search(declaration):
            return None
        families.update(name for name, pattern in _FAMILIES if pattern.search(declaration))
    return ", ".join(sorted(families)) or None


def _readable_code(path: Path) -> str | None:
    """The file's text if it is UTF-8 source that looks written rather than generated."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    if not text.strip() or len(text) / (text.count("\n") + 1) > MAX_MEAN_LINE_CHARS:
        return None
    return text


def _stdlib_paths(root: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-")
        )
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                yield path.relative_to(root).as_posix(), path


def _package_paths() -> tuple[list[tuple[str, Path, Source]], list[dict]]:
    """`.py` files of the permissively licensed distributions importable here (first of a name on
    sys.path, as imports see them), with the distributions left out and why."""
    files: list[tuple[str, Path, Source]] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    dists = sorted(
        importlib.metadata.distributions(),
        key=lambda d: re.sub(r"[-_.]+", "-", (d.metadata["Name"] or "").lower()),
    )
    for dist in dists:  # stable sort: for one name, sys.path order is kept
        name, version = dist.metadata["Name"] or "", dist.metadata["Version"] or ""
        key = re.sub(r"[-_.]+", "-", name.lower())
        if not key or key in seen:
            continue
        seen.add(key)
        licence = permissive_licence(dist.metadata)
        if licence is None:
            declared = dist.metadata.get("License-Expression") or dist.metadata.get("License") or ""
            skipped.append(
                {
                    "name": name,
                    "version": version,
                    "reason": "licence not permissive or unknown",
                    "declared": declared.strip().split("\n")[0][:80],
                }
            )
            continue
        site = Path(dist.locate_file(""))
        source = Source(name, version, licence)
        for rel in dist.files or []:
            parts = rel.parts
            if (
                rel.suffix != ".py"
                or ".." in parts
                or _VENDORED_DIRS & set(parts)
                or "__pycache__" in parts
            ):
                continue
            files.append(("site-packages/" + rel.as_posix(), site / rel, source))
    return files, skipped


def load_corpus(
    root: Path, max_bytes: int, held_out_percent: int, site_packages: bool = True
) -> Corpus:
    """The stdlib under `root`, then (with `site_packages`) package files, up to `max_bytes` in all.

    Files come in path-hash order within each of the two parts, and the corpus is the longest
    prefix of that order within the budget. A file whose exact text was already taken (vendored or
    copied modules are common) is skipped: duplicates would weigh some code several times and,
    split by path, would put held-out text into training.
    """
    stdlib = Source(STDLIB, platform.python_version(), "PSF-2.0")
    candidates = sorted(((rel, path, stdlib) for rel, path in _stdlib_paths(root)), key=_hash_order)
    skipped: list[dict] = []
    if site_packages:
        packaged, skipped = _package_paths()
        candidates += sorted(packaged, key=_hash_order)
    files: list[SourceFile] = []
    seen_texts: set[bytes] = set()
    total = 0
    for (rel, _, source), text in _read_in_order(candidates):
        if text is None:
            continue
        data = text.encode()
        size = len(data)
        if total + size > max_bytes:
            break  # a prefix of the order: a larger budget only adds files, never swaps them
        fingerprint = hashlib.sha1(data).digest()
        if fingerprint in seen_texts:
            continue
        seen_texts.add(fingerprint)
        files.append(SourceFile(rel, text, source.name))
        source.files += 1
        source.bytes += size
        total += size
    held = [f for f in files if f.digest % 100 < held_out_percent]
    train = [f for f in files if f.digest % 100 >= held_out_percent]
    if not train or not held:
        raise ValueError(
            f"corpus under {root} too small to split: {len(train)} train / {len(held)} held-out files"
        )
    packages = {
        id(source): source for _, _, source in candidates if source.files and source is not stdlib
    }
    sources = [stdlib, *sorted(packages.values(), key=lambda s: s.name.lower())]
    return Corpus(root, train, held, sources, skipped)


def _read_in_order(
    candidates: list[tuple[str, Path, Source]],
    batch: int = 512,
) -> Iterator[tuple[tuple[str, Path, Source], str | None]]:
    """Candidates with their text (None: not usable), read ahead by a thread pool in batches: tens
    of thousands of small files on a cold disk, of which the caller may need only the first part."""
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for first in range(0, len(candidates), batch):
            part = candidates[first : first + batch]
            yield from zip(part, pool.map(_readable_code, [c[1] for c in part]))


def _hash_order(candidate: tuple[str, Path, Source]) -> tuple[int, str]:
    return path_digest(candidate[0]), candidate[0]


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
