"""Tokenizers: byte-level BPE trained locally with HF `tokenizers`, or plain bytes; one class for both.

Both kinds are a `tokenizers` byte-level BPE (GPT-2 byte-to-unicode alphabet, ByteLevel pre-tokenizer and
decoder), so any text round-trips exactly (`decode(encode(s)) == s`, non-ASCII included) and both save to the
same `tokenizer.json`. The bytes kind is that BPE with no merges and a fixed vocabulary: id = byte + 3.

Ids 0, 1, 2 are `<|bos|>`, `<|eos|>`, `<|pad|>`, matching `ModelConfig.bos_token_id`/`eos_token_id`.
`encode` never adds them and never parses them out of the text (a source file that contains the string
"<|eos|>" is encoded as ordinary bytes); `decode` drops them.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from glm_fast.data.corpus import SourceFile, iter_texts

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")  # ids 0, 1, 2
BYTES_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
KINDS = ("bpe", "bytes")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet of `pre_tokenizers.ByteLevel`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(others))]
    return dict(zip(printable + others, map(chr, chars)))


def _byte_level(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


class Tokenizer:
    """A byte-level tokenizer with fixed special ids (bos 0, eos 1, pad 2); build it with `train_tokenizer`,
    `bytes_tokenizer` or `Tokenizer.load`."""

    def __init__(self, backend: tokenizers.Tokenizer, kind: str):
        if kind not in KINDS:
            raise ValueError(f"{kind=}: use one of {KINDS}")
        ids = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise ValueError(f"special tokens {SPECIAL_TOKENS} have ids {ids}, expected [0, 1, 2] to match the "
                             "model config's bos/eos ids: build the tokenizer with train_tokenizer or bytes_tokenizer")
        backend.encode_special_tokens = True  # not serialized by `tokenizers`: set on every construction
        self.backend = backend
        self.kind = kind
        self.bos_id, self.eos_id, self.pad_id = ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: the key of caches that hold its token ids."""
        return hashlib.sha256(f"{self.kind}\n{self.backend.to_str()}".encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts, in parallel inside `tokenizers` (Rust threads)."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens dropped; byte sequences that are not UTF-8 decode to U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | pathlib.Path) -> pathlib.Path:
        """Writes `tokenizer.json` (loadable by HF `tokenizers` alone) and `tokenizer_meta.json`; atomic."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id}
        _atomic_write(directory / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        _atomic_write(directory / META_FILE, json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> "Tokenizer":
        """Reads what `save` wrote; errors name the path and the fix."""
        directory = pathlib.Path(directory)
        for name in (TOKENIZER_FILE, META_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"no tokenizer at {str(directory)!r}: {name} is missing. Create one with train_tokenizer(...) "
                    "or bytes_tokenizer() and .save() it there (or use load_or_train_tokenizer)")
        try:
            meta = json.loads((directory / META_FILE).read_text())
            tokenizer = cls(tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_FILE)), meta["kind"])
        except Exception as e:  # json, KeyError, the Rust parser's Exception, our ValueError
            raise ValueError(f"tokenizer at {str(directory)!r} is corrupt ({type(e).__name__}: {e}): delete the "
                             "directory and create the tokenizer again") from e
        if tokenizer.vocab_size != meta.get("vocab_size"):
            raise ValueError(f"tokenizer at {str(directory)!r}: {TOKENIZER_FILE} has {tokenizer.vocab_size} ids but "
                             f"{META_FILE} says {meta.get('vocab_size')}: delete the directory and create it again")
        return tokenizer

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def bytes_tokenizer() -> Tokenizer:
    """The plain byte tokenizer: specials 0..2, then byte b -> id b + 3 (vocab 259)."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab |= {char: byte + len(SPECIAL_TOKENS) for byte, char in _bytes_to_unicode().items()}
    backend = _byte_level(tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[])))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(backend, "bytes")


def train_tokenizer(files_or_texts: Iterable[SourceFile | pathlib.Path | str], vocab_size: int,
                    min_frequency: int = 2) -> Tokenizer:
    """Trains a byte-level BPE of at most `vocab_size` ids (specials and all 256 bytes included).

    Items are `SourceFile`s, `pathlib.Path`s (read as UTF-8) or texts (`str`); unreadable files are skipped.
    Training is deterministic for the same inputs in the same order (ties between equally frequent pairs are
    broken by the pair itself) and takes ~6 s for the whole stdlib (31 M characters) on 2 cores.
    """
    if vocab_size < BYTES_VOCAB_SIZE:
        raise ValueError(f"{vocab_size=}: a byte-level BPE needs >= {BYTES_VOCAB_SIZE} ids (3 specials + 256 "
                         "bytes); use bytes_tokenizer() for exactly that")

    def texts() -> Iterable[str]:
        for item in files_or_texts:
            if isinstance(item, str):
                yield item
            else:
                yield from iter_texts([item if isinstance(item, SourceFile) else SourceFile(item.parent, item.name)])

    backend = _byte_level(tokenizers.Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts(), trainer)
    return Tokenizer(backend, "bpe")


def load_or_train_tokenizer(kind: str, vocab_size: int, train_files: Sequence[SourceFile],
                            cache_dir: str | pathlib.Path) -> Tokenizer:
    """The tokenizer of `kind` for these train files, from `cache_dir` if built before, else built and saved.

    The cache entry is keyed by kind, vocab size, Python version and the train files' relative paths, so a
    different interpreter or split builds a new one. `vocab_size` is ignored for the bytes kind (always 259).
    """
    if kind not in KINDS:
        raise ValueError(f"tokenizer kind {kind!r}: use one of {KINDS} (config field train.tokenizer)")
    if kind == "bytes":
        return bytes_tokenizer()
    key = hashlib.sha256(json.dumps([vocab_size, sys.version, [f.relpath for f in train_files]]).encode())
    directory = pathlib.Path(cache_dir) / f"tokenizer-{kind}-{vocab_size}-{key.hexdigest()[:12]}"
    if (directory / META_FILE).is_file():
        return Tokenizer.load(directory)
    tokenizer = train_tokenizer(train_files, vocab_size)
    tokenizer.save(directory)
    return tokenizer
