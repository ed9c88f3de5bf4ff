"""The training corpus: the `.py` files of the running interpreter's CPython standard library.

Present on every machine, so nothing is downloaded (DESIGN.md sec. 6). Files are listed in sorted relative-path
order and split BY FILE into train/validation with a stable hash of the relative path (sha256, not Python's
salted `hash`), so the split is identical across runs, processes and machines with the same Python version, and
adding or removing one file never moves another across the split.

    split = load_corpus(val_fraction=0.05)
    text = split.train[0].read_text()        # None for the few deliberately non-UTF-8 test files
    prompts = held_out_prompts(split.validation, num_prompts=8)
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig
from typing import Iterable, Iterator, NamedTuple, Sequence

# Third-party packages installed inside the stdlib tree (pip, Debian) are not the corpus.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One corpus file: its root and POSIX relative path; the text is read on demand, not held."""

    root: pathlib.Path
    relpath: str

    @property
    def path(self) -> pathlib.Path:
        return self.root / self.relpath

    def read_text(self) -> str | None:
        """The file as UTF-8 text, or None when it is unreadable or not UTF-8 (CPython ships a few on purpose)."""
        try:
            return self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None


class CorpusSplit(NamedTuple):
    """Train and validation files, each list in sorted relative-path order."""

    train: list[SourceFile]
    validation: list[SourceFile]


def stdlib_root() -> pathlib.Path:
    """The directory of the running interpreter's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: str | pathlib.Path | None = None) -> list[SourceFile]:
    """All `.py` files under `root` (default: the stdlib), sorted by relative path, site/dist-packages excluded."""
    root = pathlib.Path(root) if root is not None else stdlib_root()
    files = sorted(
        (SourceFile(root, rel.as_posix()) for rel in (p.relative_to(root) for p in root.rglob("*.py"))
         if not _EXCLUDED_DIRS & set(rel.parts)),
        key=lambda f: f.relpath)
    if not files:
        raise FileNotFoundError(
            f"no .py files under {str(root)!r}: this Python may have been installed without its standard library "
            "sources (some slim containers ship only .pyc); install the full stdlib or pass root= a source tree")
    return files


def stable_unit_hash(relpath: str) -> float:
    """A uniform number in [0, 1) from sha256 of the path: the same on every run, process and machine."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(files: Sequence[SourceFile], val_fraction: float) -> CorpusSplit:
    """Splits by file: a file is in validation iff `stable_unit_hash(relpath) < val_fraction`."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"{val_fraction=}: must be in (0, 1)")
    ordered = sorted(files, key=lambda f: f.relpath)
    validation = [f for f in ordered if stable_unit_hash(f.relpath) < val_fraction]
    train = [f for f in ordered if stable_unit_hash(f.relpath) >= val_fraction]
    if not train or not validation:
        raise ValueError(
            f"splitting {len(ordered)} files with {val_fraction=} left train={len(train)}, "
            f"validation={len(validation)} files: use more files or a val_fraction nearer 0.5")
    return CorpusSplit(train, validation)


def load_corpus(val_fraction: float, root: str | pathlib.Path | None = None) -> CorpusSplit:
    """The stdlib (or `root`) split into train/validation files; see `split_files`."""
    return split_files(list_source_files(root), val_fraction)


def iter_texts(files: Iterable[SourceFile]) -> Iterator[str]:
    """The texts of `files` in order, skipping unreadable and non-UTF-8 files."""
    for f in files:
        text = f.read_text()
        if text is not None:
            yield text


def held_out_prompts(files: Sequence[SourceFile], num_prompts: int = 8, num_lines: int = 4) -> list[str]:
    """The first `num_lines` lines of `num_prompts` files (pass the validation split), for acceptance runs.

    Files are visited in stable-hash order, a deterministic spread over the packages rather than the
    alphabetically first few; files of `num_lines` lines or fewer (nothing left to continue) are passed over.
    """
    prompts = []
    for f in sorted(files, key=lambda f: stable_unit_hash(f.relpath)):
        text = f.read_text()
        if text is None:
            continue
        lines = text.splitlines(keepends=True)
        if len(lines) > num_lines:
            prompts.append("".join(lines[:num_lines]))
        if len(prompts) == num_prompts:
            return prompts
    raise ValueError(f"only {len(prompts)} of {len(files)} files have more than {num_lines} lines; "
                     f"asked for {num_prompts=}: pass more files or lower num_prompts/num_lines")
