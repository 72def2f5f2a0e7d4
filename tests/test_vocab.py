"""Coord vocabulary: discovery, validation, coord_id_map agreement, and decoding that keeps coord tokens."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import SMALL_MODEL

from coordexp.build_base.tiny import add_coord_tokens, build_tiny, build_tokenizer
from coordexp.core.codec import COORD_TOKENS, K, encode_xy, parse_coord_token
from coordexp.core.vocab import (
    CoordVocabError,
    check_coord_tokens_atomic,
    coord_id_map,
    coord_id_map_from_tokenizer,
    coord_id_map_from_vocab,
    find_coord_token_ids,
    load_coord_vocab,
    write_coord_vocab,
)

DESCS = ["red circle", "blue square", "green triangle", "yellow line"]


def _records(n: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        objs = []
        for _ in range(rng.randint(1, 3)):
            x, y = rng.randint(0, 90), rng.randint(0, 90)
            objs.append({"desc": rng.choice(DESCS), "bbox_2d": encode_xy([x, y, x + 30, y + 30], 128, 128)})
        objs.append({"desc": "blue triangle", "poly": encode_xy([10, 10, 40, 10, 25, 35], 128, 128)})
        objs.append({"desc": "green line", "line": encode_xy([0, 0, 127, 127], 128, 128)})
        recs.append({"id": i, "images": [f"images/{i}.png"], "width": 128, "height": 128, "objects": objs})
    return recs


def _corpus() -> list[str]:
    from coordexp.build_base.tiny import bpe_corpus

    return bpe_corpus(_records())


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(_corpus(), 1024, coord_tokens=True)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return build_tokenizer(_corpus(), 1024, coord_tokens=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "base"
    build_tiny(
        None,
        out,
        records=_records(),
        **{**SMALL_MODEL, "vision_depth": 1},
    )
    return out


# ---------------------------------------------------------------------------------------------
# find_coord_token_ids


def test_no_coord_tokens_gives_none(plain_tokenizer):
    assert find_coord_token_ids(plain_tokenizer) is None


def test_all_coord_tokens_in_bin_order(tokenizer):
    ids = find_coord_token_ids(tokenizer)
    assert ids is not None and len(ids) == K
    assert all(b > a for a, b in zip(ids, ids[1:]))
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<|coord_0|>"
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|coord_999|>"


def test_partial_coord_set_is_an_error():
    from tokenizers import AddedToken

    tok = build_tokenizer(_corpus(), 512, coord_tokens=False)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in COORD_TOKENS[:10]])
    with pytest.raises(CoordVocabError, match="10 of the 1000"):
        find_coord_token_ids(tok)


def test_misordered_coord_set_is_an_error():
    from tokenizers import AddedToken

    tok = build_tokenizer(_corpus(), 512, coord_tokens=False)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in sorted(COORD_TOKENS)])  # string order
    with pytest.raises(CoordVocabError, match="not in bin order"):
        find_coord_token_ids(tok)


def test_add_coord_tokens_twice_adds_nothing(plain_tokenizer):
    import copy

    tok = copy.deepcopy(plain_tokenizer)
    assert add_coord_tokens(tok) == K
    assert add_coord_tokens(tok) == 0
    assert find_coord_token_ids(tok) is not None


# ---------------------------------------------------------------------------------------------
# coord_id_map


def test_coord_id_map_from_tokenizer(tokenizer):
    v = ((len(tokenizer) + 63) // 64) * 64
    m = coord_id_map_from_tokenizer(tokenizer, v)
    assert m.dtype == torch.long and m.shape == (v,)
    ids = find_coord_token_ids(tokenizer)
    assert torch.equal(m[torch.tensor(ids)], torch.arange(K))
    assert int((m >= 0).sum()) == K
    assert torch.all(m[: ids[0]] == -1) and torch.all(m[ids[-1] + 1 :] == -1)


def test_coord_id_map_rejects_too_small_vocab(tokenizer):
    with pytest.raises(CoordVocabError, match="outside the model vocabulary"):
        coord_id_map_from_tokenizer(tokenizer, len(tokenizer) - 1)


def test_coord_id_map_from_tokenizer_without_coords(plain_tokenizer):
    with pytest.raises(CoordVocabError, match="no coord tokens"):
        coord_id_map_from_tokenizer(plain_tokenizer, 2048)


def test_write_and_load_coord_vocab(tokenizer, tmp_path):
    v = len(tokenizer) + 17
    data = write_coord_vocab(tokenizer, v, tmp_path)
    on_disk = json.loads((tmp_path / "coord_vocab.json").read_text())
    assert on_disk == data
    assert set(on_disk) == {"K", "coord_token_ids", "vocab_size", "tokenizer_len"}
    assert on_disk["K"] == K and on_disk["vocab_size"] == v and on_disk["tokenizer_len"] == len(tokenizer)
    assert load_coord_vocab(tmp_path) == data
    assert load_coord_vocab(tmp_path / "coord_vocab.json") == data
    assert torch.equal(coord_id_map_from_vocab(data), coord_id_map_from_tokenizer(tokenizer, v))
    assert torch.equal(coord_id_map_from_vocab(tmp_path), coord_id_map_from_tokenizer(tokenizer, v))


def test_load_coord_vocab_missing_file_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_base"):
        load_coord_vocab(tmp_path)


def test_coord_id_map_of_checkpoint_agrees(checkpoint):
    from transformers import AutoTokenizer

    m = coord_id_map(checkpoint)
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert m.shape == (cfg["text_config"]["vocab_size"],)
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    assert torch.equal(m, coord_id_map_from_tokenizer(tok, cfg["text_config"]["vocab_size"]))


def test_coord_id_map_detects_disagreement(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    data = json.loads((bad / "coord_vocab.json").read_text())
    data["coord_token_ids"] = [i + 1 for i in data["coord_token_ids"]]  # shifted by one: still ordered
    (bad / "coord_vocab.json").write_text(json.dumps(data))
    with pytest.raises(CoordVocabError, match="disagree"):
        coord_id_map(bad)


def test_coord_id_map_detects_vocab_size_mismatch(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    data = json.loads((bad / "coord_vocab.json").read_text())
    data["vocab_size"] += 64
    (bad / "coord_vocab.json").write_text(json.dumps(data))
    with pytest.raises(CoordVocabError, match="vocab_size"):
        coord_id_map(bad)


# ---------------------------------------------------------------------------------------------
# decoding keeps coord tokens (DESIGN §4)


def test_each_coord_token_is_one_token(tokenizer):
    ids = find_coord_token_ids(tokenizer)
    for k in [0, 1, 7, 10, 42, 99, 100, 123, 500, 998, 999]:
        assert tokenizer.encode(COORD_TOKENS[k], add_special_tokens=False) == [ids[k]]
    # no merging with neighbouring text or with each other
    got = tokenizer.encode('["<|coord_1|><|coord_10|>", "<|coord_100|>"]', add_special_tokens=False)
    assert [tokenizer.convert_ids_to_tokens(i) for i in got].count("<|coord_1|>") == 1
    assert ids[10] in got and ids[100] in got


def test_answer_round_trip_and_skip_special(tokenizer):
    from coordexp.core.contract import render_answer

    for rec in _records(5, seed=3):
        answer = render_answer(rec["objects"])
        ids = tokenizer.encode(answer, add_special_tokens=False)
        assert tokenizer.decode(ids) == answer
        assert tokenizer.decode(ids, skip_special_tokens=True) == answer
        # exactly one token per coord value, in order
        id_to_bin = {i: k for k, i in enumerate(find_coord_token_ids(tokenizer))}
        bins = [id_to_bin[i] for i in ids if i in id_to_bin]
        want = [parse_coord_token(t) for o in rec["objects"] for t in next(v for k, v in o.items() if k != "desc")]
        assert bins == want
        # the end-of-turn token is dropped by skip_special_tokens, the coord tokens are not
        with_eos = ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        assert tokenizer.decode(with_eos, skip_special_tokens=True) == answer


def test_check_coord_tokens_atomic_accepts_and_rejects(tokenizer):
    check_coord_tokens_atomic(tokenizer)
    from tokenizers import AddedToken

    tok = build_tokenizer(_corpus(), 512, coord_tokens=False)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in COORD_TOKENS], special_tokens=True)
    with pytest.raises(CoordVocabError, match="special"):
        check_coord_tokens_atomic(tok)
