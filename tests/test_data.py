"""glm_fast.data: stdlib corpus split, tokenizers, and the grain pipeline (determinism, resume, sharding).

Uses a deterministic subset of the stdlib (every 40th file, ~45 files) and a 512-id BPE to stay fast.
"""
import json

import numpy as np
import pytest

from glm_fast.config import load_config
from glm_fast.data import (
    BYTES_VOCAB_SIZE,
    Tokenizer,
    build_pipeline,
    bytes_tokenizer,
    held_out_prompts,
    iter_texts,
    iterate,
    list_source_files,
    pack,
    split_files,
    stable_unit_hash,
    tokenize_files,
    train_dataset,
    train_tokenizer,
    val_dataset,
)

TRICKY = [
    "",
    "\t\tif x:\n\t\t\treturn 1\n",
    "héllo wörld — ✓ 世界 🎉 ﬁ\u200b",
    "line\r\nwindows\r\n",
    "trailing   \n\n\n   ",
    "s = '<|bos|><|eos|><|pad|>'  # specials as text",
    "\x00\x01\x7f control",
    "    " * 40 + "deep()",
]


@pytest.fixture(scope="module")
def all_files():
    return list_source_files()


@pytest.fixture(scope="module")
def subset(all_files):
    return split_files(all_files[::40], val_fraction=0.3)


@pytest.fixture(scope="module")
def bpe(subset):
    return train_tokenizer(subset.train, vocab_size=512)


# ---- corpus ----------------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_covers_all_files(all_files):
    split = split_files(all_files, val_fraction=0.05)
    assert split == split_files(list(reversed(all_files)), val_fraction=0.05)
    train, val = {f.relpath for f in split.train}, {f.relpath for f in split.validation}
    assert not train & val
    assert train | val == {f.relpath for f in all_files}
    assert 0.03 < len(val) / len(all_files) < 0.07  # the hash spreads paths uniformly
    assert [f.relpath for f in split.train] == sorted(train)


def test_split_is_by_path_so_removing_a_file_moves_no_other(all_files):
    full = split_files(all_files, val_fraction=0.2)
    smaller = split_files(all_files[1:], val_fraction=0.2)
    assert smaller.train == [f for f in full.train if f != all_files[0]]
    assert smaller.validation == [f for f in full.validation if f != all_files[0]]


def test_stable_hash_is_pinned():
    # A changed hash silently changes every run's split: this value must never move.
    assert stable_unit_hash("os.py") == 0.850948727781281


def test_listing_skips_site_packages_and_reading_skips_non_utf8(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("a = 1\n")
    (tmp_path / "site-packages" / "third").mkdir(parents=True)
    (tmp_path / "site-packages" / "third" / "x.py").write_text("x = 1\n")
    (tmp_path / "latin1.py").write_bytes("é = 1\n".encode("latin-1"))
    (tmp_path / "notes.txt").write_text("not python\n")
    files = list_source_files(tmp_path)
    assert [f.relpath for f in files] == ["latin1.py", "pkg/a.py"]
    assert list(iter_texts(files)) == ["a = 1\n"]


def test_listing_an_empty_root_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        list_source_files(tmp_path)


def test_held_out_prompts_are_file_openings(subset):
    prompts = held_out_prompts(subset.validation, num_prompts=3, num_lines=2)
    assert prompts == held_out_prompts(subset.validation, num_prompts=3, num_lines=2)
    assert len(set(prompts)) == 3
    openings = list(iter_texts(subset.validation))
    for p in prompts:
        assert len(p.splitlines()) == 2
        assert any(t.startswith(p) for t in openings)


# ---- tokenizer -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_round_trip_on_stdlib_and_tricky_text(kind, bpe, subset):
    tok = bpe if kind == "bpe" else bytes_tokenizer()
    texts = list(iter_texts(subset.train[:10])) + TRICKY
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text
        assert all(3 <= i < tok.vocab_size for i in ids)  # specials never come out of plain text


def test_special_token_ids_match_the_config(bpe):
    cfg = load_config("tiny")
    for tok in (bpe, bytes_tokenizer()):
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
        assert (tok.bos_id, tok.eos_id) == (cfg.model.bos_token_id, cfg.model.eos_token_id)
        assert [tok.backend.id_to_token(i) for i in range(3)] == ["<|bos|>", "<|eos|>", "<|pad|>"]
        assert tok.decode([0, *tok.encode("x = 1"), 1, 2]) == "x = 1"


def test_bytes_tokenizer_is_byte_plus_three():
    tok = bytes_tokenizer()
    assert tok.vocab_size == BYTES_VOCAB_SIZE == 259
    text = "é\t\x00ÿ"
    assert tok.encode(text) == [b + 3 for b in text.encode("utf-8")]


def test_bpe_is_deterministic_and_compresses(bpe, subset):
    assert bpe.vocab_size == 512
    assert train_tokenizer(subset.train, vocab_size=512).fingerprint == bpe.fingerprint
    text = "".join(iter_texts(subset.validation))
    assert len(bpe.encode(text)) < 0.6 * len(text.encode("utf-8"))


def test_bpe_rejects_a_vocab_without_room_for_bytes():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["x = 1"], vocab_size=100)


def test_save_load_round_trip(bpe, tmp_path):
    for tok, sub in ((bpe, "bpe"), (bytes_tokenizer(), "bytes")):
        loaded = Tokenizer.load(tok.save(tmp_path / sub))
        assert (loaded.kind, loaded.vocab_size, loaded.fingerprint) == (tok.kind, tok.vocab_size, tok.fingerprint)
        assert loaded.encode(TRICKY[2]) == tok.encode(TRICKY[2])
        assert loaded.encode(TRICKY[5]) == tok.encode(TRICKY[5])  # specials stay text after loading too


def test_load_errors_name_the_path(bpe, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(missing)
    bpe.save(tmp_path / "broken")
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.*corrupt"):
        Tokenizer.load(tmp_path / "broken")


# ---- pipeline --------------------------------------------------------------------------------------------

def _take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def test_token_stream_is_delimited_documents_and_cached(bpe, subset, tmp_path, monkeypatch):
    stream = tokenize_files(subset.train, bpe, tmp_path)  # [N]
    docs = list(iter_texts(subset.train))
    assert np.sum(stream == bpe.bos_id) == np.sum(stream == bpe.eos_id) == len(docs)
    starts = np.flatnonzero(stream == bpe.bos_id)
    ends = np.flatnonzero(stream == bpe.eos_id)
    assert bpe.decode(stream[starts[0] + 1:ends[0]].tolist()) == docs[0]
    assert stream[0] == bpe.bos_id and stream[-1] == bpe.eos_id
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 1

    def fail(texts):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(bpe, "encode_batch", fail)
    np.testing.assert_array_equal(tokenize_files(subset.train, bpe, tmp_path), stream)


def test_pack_windows_overlap_by_one_token():
    stream = np.arange(50, dtype=np.uint16)
    windows = pack(stream, seq_len=8)  # [6, 9]
    assert windows.shape == (6, 9)
    np.testing.assert_array_equal(windows[:-1, -1], windows[1:, 0])
    np.testing.assert_array_equal(np.concatenate([windows[:, :-1].ravel(), windows[-1:, -1]]), stream[:49])


def test_train_batches_shapes_dtypes_and_ids(bpe, subset):
    stream = tokenize_files(subset.train, bpe)
    it = iterate(train_dataset(stream, seq_len=32, batch_size=4, seed=0, num_shards=1, shard_index=0))
    for tokens in _take(it, 5):
        assert tokens.shape == (4, 33) and tokens.dtype == np.int32
        assert 0 <= tokens.min() and tokens.max() < bpe.vocab_size


def _synthetic_ds(seed, **kw):
    # Token value = stream position, so every window is identified by its first token.
    kw = dict(seq_len=4, batch_size=4, num_shards=1, shard_index=0) | kw
    return train_dataset(np.arange(4 * 40 + 1, dtype=np.int32), seed=seed, **kw)  # 40 windows


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
    first = np.concatenate(_take(iterate(_synthetic_ds(seed=0)), 20))[:, 0]  # two epochs of window ids
    assert np.array_equal(first, np.concatenate(_take(iterate(_synthetic_ds(seed=0)), 20))[:, 0])
    assert not np.array_equal(first, np.concatenate(_take(iterate(_synthetic_ds(seed=1)), 20))[:, 0])
    epoch1, epoch2 = first[:40], first[40:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(0, 160, 4))  # each epoch visits every window once
    assert not np.array_equal(epoch1, epoch2)
    assert not np.array_equal(epoch1, np.sort(epoch1))


def test_resume_from_saved_state_yields_the_same_batches():
    uninterrupted = iterate(_synthetic_ds(seed=3))
    _take(uninterrupted, 7)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # survives a JSON checkpoint
    expected = _take(uninterrupted, 15)  # crosses the epoch boundary at batch 10
    resumed = iterate(_synthetic_ds(seed=3), state)
    for want, got in zip(expected, _take(resumed, 15)):
        np.testing.assert_array_equal(got, want)


def test_shards_are_disjoint_and_split_the_global_batch():
    shard_ids = []
    for index in range(2):
        ds = _synthetic_ds(seed=0, batch_size=4, num_shards=2, shard_index=index, num_epochs=1)
        batches = list(iterate(ds))
        assert all(b["tokens"].shape == (2, 5) for b in batches)
        shard_ids.append({int(t) for b in batches for t in b["tokens"][:, 0]})
    assert not shard_ids[0] & shard_ids[1]
    assert shard_ids[0] | shard_ids[1] == set(range(0, 160, 4))


def test_val_batches_are_fixed_and_finite():
    stream = np.arange(4 * 40 + 1, dtype=np.int32)
    ds = val_dataset(stream, seq_len=4, batch_size=8, num_shards=1, shard_index=0)
    batches = [b["tokens"] for b in iterate(ds)]
    assert len(batches) == 5
    np.testing.assert_array_equal(np.concatenate(batches)[:, 0], np.arange(0, 160, 4))  # in order, unshuffled
    limited = val_dataset(stream, seq_len=4, batch_size=8, num_batches=2, num_shards=1, shard_index=0)
    assert len(list(iterate(limited))) == 2


def test_pipeline_errors_name_the_fix():
    stream = np.arange(4 * 40 + 1, dtype=np.int32)
    with pytest.raises(ValueError, match="not divisible by num_shards=3"):
        train_dataset(stream, seq_len=4, batch_size=4, seed=0, num_shards=3, shard_index=0)
    with pytest.raises(ValueError, match="validation set has 40 windows.*fewer than one batch of 64"):
        val_dataset(stream, seq_len=4, batch_size=64, num_shards=1, shard_index=0)


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_build_pipeline_from_config(kind, subset, tmp_path):
    cfg = load_config("tiny", {"train.tokenizer": kind, "train.batch_size": 4, "train.seq_len": 64})
    data = build_pipeline(cfg, tmp_path, corpus=subset, num_shards=1, shard_index=0)
    assert data.tokenizer.kind == kind
    tokens = next(data.train_iterator())["tokens"]
    assert tokens.shape == (4, 65) and tokens.max() < cfg.model.vocab_size
    val = [b["tokens"] for b in data.val_iterator(num_batches=2)]
    assert len(val) == 2
    again = build_pipeline(cfg, tmp_path, corpus=subset, num_shards=1, shard_index=0)  # from the caches
    assert again.tokenizer.fingerprint == data.tokenizer.fingerprint
    for want, got in zip(val, again.val_iterator(num_batches=2)):
        np.testing.assert_array_equal(got["tokens"], want)


def test_build_pipeline_rejects_a_model_vocab_too_small(subset, tmp_path):
    cfg = load_config("tiny", {"train.tokenizer": "bytes", "model.vocab_size": 256})
    with pytest.raises(ValueError, match="raise model.vocab_size to at least 259"):
        build_pipeline(cfg, tmp_path, corpus=subset)
