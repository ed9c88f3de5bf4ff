"""Training data: the CPython stdlib corpus, byte-level tokenizers, and the grain pipeline (DESIGN.md sec. 6).

    from glm_fast.data import build_pipeline
    data = build_pipeline(cfg, cache_dir="runs/cache")
    it = data.train_iterator()                 # next(it)["tokens"]: int32 [batch, seq_len + 1]
"""
from glm_fast.data.corpus import (
    CorpusSplit,
    SourceFile,
    held_out_prompts,
    iter_texts,
    list_source_files,
    load_corpus,
    split_files,
    stable_unit_hash,
    stdlib_root,
)
from glm_fast.data.pipeline import (
    DataPipeline,
    build_pipeline,
    iterate,
    pack,
    tokenize_files,
    train_dataset,
    val_dataset,
)
from glm_fast.data.tokenizer import (
    BYTES_VOCAB_SIZE,
    SPECIAL_TOKENS,
    Tokenizer,
    bytes_tokenizer,
    load_or_train_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BYTES_VOCAB_SIZE", "CorpusSplit", "DataPipeline", "SPECIAL_TOKENS", "SourceFile", "Tokenizer",
    "build_pipeline", "bytes_tokenizer", "held_out_prompts", "iter_texts", "iterate", "list_source_files",
    "load_corpus", "load_or_train_tokenizer", "pack", "split_files", "stable_unit_hash", "stdlib_root",
    "tokenize_files", "train_dataset", "train_tokenizer", "val_dataset",
]
