"""The token pipeline (grain): tokenized files -> packed sequences -> shuffled, sharded, batched, resumable.

Every file becomes one document `[bos] + tokens + [eos]`; documents are concatenated in corpus order into one
token stream (cached on disk as `.npy`, keyed by the tokenizer's fingerprint, the Python version and the files),
which is cut into windows of `seq_len + 1` tokens with stride `seq_len` (consecutive windows share one token, so
every next-token pair of the stream is trained on). A trainer slices a batch as

    x = batch["tokens"]                              # int32 [B, seq_len + 1]
    inputs, targets = x[:, :-1], x[:, 1:]            # [B, seq_len] each; targets[:, t] follows inputs[:, t]

Windows cross document boundaries (there is no cross-document attention mask; `bos`/`eos` mark the seams).
Training windows are split across shards (one per JAX process by default), shuffled with the seed and reshuffled
every epoch, then batched; the grain iterator is checkpointable:

    it = pipeline.train_iterator()
    state = it.get_state()                           # a small JSON-serialisable dict, e.g. {"next_index": 120}
    it = pipeline.train_iterator(state)              # yields exactly the batches the old one would have

`batch_size` is the GLOBAL batch: each shard yields `batch_size // num_shards` rows, and
`jax.make_array_from_process_local_data` assembles the global `[batch_size, seq_len + 1]` array.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np

from glm_fast.config import Config
from glm_fast.data.corpus import CorpusSplit, SourceFile, load_corpus
from glm_fast.data.tokenizer import Tokenizer, load_or_train_tokenizer

_ENCODE_CHUNK = 64  # files per `encode_batch` call: parallel enough, and bounds the Encoding objects held at once
# The windows live in memory and a batch is a gather of rows: a reader thread would only contend for the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def tokenize_files(files: Sequence[SourceFile], tokenizer: Tokenizer,
                   cache_dir: str | pathlib.Path | None = None) -> np.ndarray:
    """The token stream of `files`: `[bos] doc [eos] [bos] doc [eos] ...`, uint16 when the vocab fits, else int32.

    With `cache_dir`, the stream is read from (or written to) `tokens-<key>.npy`, where the key hashes the
    tokenizer's fingerprint, the Python version and each file's path, size and mtime. Unreadable files are skipped.
    """
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    path = None
    if cache_dir is not None:
        stats = [(str(f.path), f.path.stat().st_size, f.path.stat().st_mtime_ns) for f in files]
        key = json.dumps([tokenizer.fingerprint, sys.version, stats])
        path = pathlib.Path(cache_dir) / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
        if path.is_file():
            return np.load(path)
    pieces = []
    for start in range(0, len(files), _ENCODE_CHUNK):
        texts = [t for t in (f.read_text() for f in files[start:start + _ENCODE_CHUNK]) if t is not None]
        for ids in tokenizer.encode_batch(texts):
            pieces.append(np.array([tokenizer.bos_id, *ids, tokenizer.eos_id], dtype))
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), dtype)  # [N]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, stream)
        os.replace(tmp, path)  # atomic: concurrent processes never read a half-written cache
    return stream


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows of `seq_len + 1` tokens at stride `seq_len`: a read-only view `[(N - 1) // seq_len, seq_len + 1]`."""
    if seq_len <= 0:
        raise ValueError(f"{seq_len=}: must be positive")
    if len(stream) <= seq_len:
        return np.zeros((0, seq_len + 1), stream.dtype)
    num = (len(stream) - 1) // seq_len
    return np.lib.stride_tricks.sliding_window_view(stream[:num * seq_len + 1], seq_len + 1)[::seq_len]


def _shard(windows: np.ndarray, batch_size: int, num_shards: int | None, shard_index: int | None,
           what: str) -> tuple[grain.MapDataset, int]:
    """This shard's windows (every `num_shards`-th, all shards the same length) and its per-shard batch size."""
    num_shards = jax.process_count() if num_shards is None else num_shards
    shard_index = jax.process_index() if shard_index is None else shard_index
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"{shard_index=} is outside [0, {num_shards=})")
    if batch_size % num_shards:
        raise ValueError(f"{batch_size=} (the global batch) is not divisible by {num_shards=}: "
                         "choose a batch size that is a multiple of the number of processes")
    local_batch = batch_size // num_shards
    per_shard = len(windows) // num_shards
    if per_shard < local_batch:
        raise ValueError(f"the {what} set has {len(windows)} windows of {windows.shape[-1]} tokens, "
                         f"{per_shard} per shard, fewer than one batch of {local_batch}: lower the batch size "
                         "or seq_len, or give it more files (train.val_fraction for validation)")
    ds = grain.MapDataset.source(windows)[shard_index:per_shard * num_shards:num_shards]
    return ds, local_batch


def _as_batch(rows: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": rows.astype(np.int32)}  # [b, seq_len + 1]


def train_dataset(stream: np.ndarray, *, seq_len: int, batch_size: int, seed: int, num_epochs: int | None = None,
                  num_shards: int | None = None, shard_index: int | None = None) -> grain.MapDataset:
    """Batches `{"tokens": int32 [batch_size // num_shards, seq_len + 1]}`, reshuffled each epoch; infinite by default.

    Batches may span an epoch boundary; the incomplete last batch of a finite run is dropped.
    """
    ds, local_batch = _shard(pack(stream, seq_len), batch_size, num_shards, shard_index, "training")
    ds = ds.shuffle(seed=seed).repeat(num_epochs, reseed_each_epoch=True)
    return ds.batch(local_batch, drop_remainder=True).map(_as_batch)


def val_dataset(stream: np.ndarray, *, seq_len: int, batch_size: int, num_batches: int | None = None,
                num_shards: int | None = None, shard_index: int | None = None) -> grain.MapDataset:
    """Unshuffled, finite batches (the same every time): at most `num_batches`, incomplete last batch dropped."""
    ds, local_batch = _shard(pack(stream, seq_len), batch_size, num_shards, shard_index, "validation")
    ds = ds.batch(local_batch, drop_remainder=True)
    if num_batches is not None:
        ds = ds[:num_batches]
    return ds.map(_as_batch)


def iterate(ds: grain.MapDataset, state: Mapping[str, Any] | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator over `ds`, optionally resumed from an earlier iterator's `get_state()`."""
    it = iter(ds.to_iter_dataset(_READ_OPTIONS))
    if state is not None:
        it.set_state(dict(state))
    return it


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compare by identity
class DataPipeline:
    """The tokenizer, the train/validation token streams and the batch settings of one run."""

    tokenizer: Tokenizer
    train_tokens: np.ndarray  # [N_train] token stream
    val_tokens: np.ndarray    # [N_val]
    seq_len: int
    batch_size: int           # global
    seed: int
    num_shards: int | None = None   # None: jax.process_count()
    shard_index: int | None = None  # None: jax.process_index()

    def train_iterator(self, state: Mapping[str, Any] | None = None) -> grain.DatasetIterator:
        """Endless shuffled training batches; pass a saved `get_state()` to resume exactly where it stopped."""
        ds = train_dataset(self.train_tokens, seq_len=self.seq_len, batch_size=self.batch_size, seed=self.seed,
                           num_shards=self.num_shards, shard_index=self.shard_index)
        return iterate(ds, state)

    def val_iterator(self, num_batches: int | None = None) -> grain.DatasetIterator:
        """The first `num_batches` validation batches (all if None), identical on every call."""
        ds = val_dataset(self.val_tokens, seq_len=self.seq_len, batch_size=self.batch_size, num_batches=num_batches,
                         num_shards=self.num_shards, shard_index=self.shard_index)
        return iterate(ds)


def build_pipeline(cfg: Config, cache_dir: str | pathlib.Path, *, corpus: CorpusSplit | None = None,
                   num_shards: int | None = None, shard_index: int | None = None) -> DataPipeline:
    """The data of a run from its config: corpus split (`train.val_fraction`), tokenizer (`train.tokenizer`,
    BPE of `model.vocab_size` ids), cached token streams, and `train.seq_len/batch_size/seed`.

    `corpus` replaces the stdlib split (tests use a few files); tokenizer and token caches live in `cache_dir`.
    """
    corpus = corpus if corpus is not None else load_corpus(cfg.train.val_fraction)
    tokenizer = load_or_train_tokenizer(cfg.train.tokenizer, cfg.model.vocab_size, corpus.train, cache_dir)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
                         f"{cfg.model.vocab_size}: raise model.vocab_size to at least {tokenizer.vocab_size}")
    for name, ours in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id)):
        if getattr(cfg.model, name) != ours:
            raise ValueError(f"model.{name}={getattr(cfg.model, name)} but the tokenizer's is {ours}: set "
                             f"model.{name}={ours}")
    return DataPipeline(
        tokenizer=tokenizer,
        train_tokens=tokenize_files(corpus.train, tokenizer, cache_dir),
        val_tokens=tokenize_files(corpus.validation, tokenizer, cache_dir),
        seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
        num_shards=num_shards, shard_index=shard_index)
