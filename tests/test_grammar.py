"""Grammar-constrained decoding: random logits through the processor always give an answer that parses cleanly.

Tokenizers: the tiny one with and without grammar tokens, and Qwen's real byte-level BPE (coordexp.build_base.qwen_bpe),
where quotes merge into neighbouring tokens (``{"``, ``":``, ``",``, ``"}}``). The processor is driven step by
step the way ``generate`` drives it (the chosen token appended, finished rows padded), with random budgets
including tight ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from test_build_base import SMALL, write_dataset

from coordexp.core.codec import coord_token
from coordexp.core.contract import render_answer
from coordexp.evaluate.grammar import START, Grammar, GrammarLimits, escaped
from coordexp.evaluate.parse import parse_prediction

DESCS = ["red circle", "blue square", "green triangle", "blue triangle", "green line", 'a "quoted" one']
RECORDS = [
    {
        "objects": [
            {"desc": d, "bbox_2d": [coord_token(k) for k in (1, 2, 30, 40)]},
            {"desc": "blue triangle", "poly": [coord_token(k) for k in (5, 6, 7, 8, 9, 10)]},
            {"desc": "green line", "line": [coord_token(k) for k in (11, 12, 13, 14)]},
        ]
    }
    for d in DESCS[:3]
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: per-step ops over V = 152k are ~20x slower when two threads fight a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_tokenizer(grammar_tokens: bool):
    from coordexp.build_base.tiny import bpe_corpus, build_tokenizer

    return build_tokenizer(bpe_corpus(RECORDS * 4, grammar=grammar_tokens), 400, grammar=grammar_tokens)


@pytest.fixture(scope="module")
def tiny_grammar_tok():
    return _tiny_tokenizer(True)


@pytest.fixture(scope="module")
def tiny_plain_tok():
    return _tiny_tokenizer(False)


@pytest.fixture(scope="module")
def qwen_tok():
    from coordexp.build_base.coord_rows import add_coord_tokens
    from coordexp.build_base.qwen_bpe import qwen_tokenizer

    tok = qwen_tokenizer("qwen3_vl")
    add_coord_tokens(tok)  # as build_base's expand does
    return tok


def _eos(tok) -> list[int]:
    return [tok.convert_tokens_to_ids("<|im_end|>")]


def drive(grammar: Grammar, tok, *, batch: int, max_new: int, seed: int, sample: bool = True) -> list[str]:
    """Run the processor over random scores as ``generate`` would; the decoded answers."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    proc = grammar.processor(max_new)
    eos = grammar.eos_ids[0]
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = torch.full((batch, 3), pad, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    # some tokens get a large random boost, so answers close descriptions and objects at varied times
    boost = torch.zeros(grammar.vocab_size)
    boost[torch.as_tensor(grammar.impure_ids)] = rng.choice([0.0, 4.0, 8.0])
    boost[torch.as_tensor(grammar.coord_ids[:1])] = 0.0
    boost[eos] = rng.choice([0.0, 6.0])
    for _ in range(max_new):
        scores = torch.randn(batch, grammar.vocab_size, generator=gen) * rng.choice([1.0, 3.0]) + boost
        out = proc(ids, scores)
        assert torch.isfinite(out).any(dim=1).all()
        if sample:
            nxt = torch.multinomial(torch.softmax(out, dim=-1), 1, generator=gen).squeeze(1)
        else:
            nxt = out.argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if done.all():
            break
    texts = []
    for row in ids[:, 3:].tolist():
        end = row.index(eos) if eos in row else None
        assert end is not None, f"no end-of-sequence within {max_new} tokens: {tok.decode(row)!r}"
        texts.append(tok.decode(row[:end], skip_special_tokens=True))
    return texts


def _check(texts: list[str], limits: GrammarLimits, descs: set[str] | None = None) -> list:
    parses = []
    for t in texts:
        p = parse_prediction(t)
        assert p.ok and not p.problems, (t, p.problems)
        assert len(p.objects) <= limits.max_objects
        for o in p.objects:
            n = len(o.bins)
            if o.kind == "bbox_2d":
                assert n == 4
            elif o.kind == "poly":
                assert n % 2 == 0 and 6 <= n <= 2 * limits.max_poly_points
            else:
                assert n % 2 == 0 and 4 <= n <= 2 * limits.max_line_points
            if descs is not None:
                assert o.desc in descs
        parses.append(p)
    return parses


def test_rendered_training_answers_are_accepted(tiny_grammar_tok, tiny_plain_tok, qwen_tok):
    """The grammar accepts exactly what render_answer writes, whatever the tokenization."""
    answers = [render_answer(r["objects"]) for r in RECORDS] + ["{}"]
    for tok in (tiny_grammar_tok, tiny_plain_tok, qwen_tok):
        g = Grammar(tok, _eos(tok), limits=GrammarLimits(max_objects=5))
        for a in answers:
            s = START
            for t in tok(a, add_special_tokens=False)["input_ids"]:
                s = g.advance(s, t)
                assert s is not None, (a, tok.convert_ids_to_tokens([t]))
            assert s[0] == 11  # DONE: only an end-of-sequence token may follow
            assert g.need(s) == 1


def test_qwen_bpe_merges_quotes_into_structure(qwen_tok):
    pieces = qwen_tok.convert_ids_to_tokens(
        qwen_tok('{"object_1": {"desc": "x"}},', add_special_tokens=False)["input_ids"]
    )
    assert '{"' in pieces and '":' in pieces and 'Ġ{"' in pieces
    for s in ('"},', '",', '"}}', 'Ġ"'):
        assert qwen_tok.convert_tokens_to_ids(s) is not None and qwen_tok.convert_tokens_to_ids(s) < 151643


@pytest.mark.parametrize("which", ["tiny_grammar_tok", "tiny_plain_tok"])
def test_random_logits_always_parse_tiny(which, request):
    tok = request.getfixturevalue(which)
    rng = random.Random(1)
    for seed in range(6):
        limits = GrammarLimits(
            max_objects=rng.choice([1, 2, 100]),
            max_poly_points=rng.choice([3, 4, 64]),
            max_line_points=rng.choice([2, 3, 64]),
            max_desc_tokens=rng.choice([1, 2, 8]),
        )
        g = Grammar(tok, _eos(tok), len(tok) + 7, limits=limits)  # a model vocabulary padded past the tokenizer
        max_new = rng.choice([4, 9, 17, 40, 120])
        _check(drive(g, tok, batch=6, max_new=max_new, seed=seed, sample=seed % 2 == 0), limits)


def test_random_logits_always_parse_qwen_bpe(qwen_tok):
    rng = random.Random(2)
    for seed, max_new in enumerate([7, 30, 100]):
        limits = GrammarLimits(max_objects=rng.choice([1, 3, 100]), max_poly_points=3, max_desc_tokens=6)
        g = Grammar(qwen_tok, _eos(qwen_tok), limits=limits)
        _check(drive(g, qwen_tok, batch=4, max_new=max_new, seed=seed, sample=True), limits)


def test_object_cap_and_tight_budget_close_cleanly(tiny_plain_tok):
    tok = tiny_plain_tok
    g = Grammar(tok, _eos(tok), limits=GrammarLimits(max_objects=2, max_desc_tokens=4))
    # a budget that fits the opening of an object but not its end: the object is still closed
    for max_new in range(g.need(START), 30):
        parses = _check(drive(g, tok, batch=4, max_new=max_new, seed=max_new), g.limits)
        assert all(len(p.objects) <= 2 for p in parses)
    many = _check(drive(g, tok, batch=8, max_new=400, seed=0), g.limits)
    assert max(len(p.objects) for p in many) == 2


def test_train_set_descriptions_only(qwen_tok, tiny_grammar_tok):
    for tok in (tiny_grammar_tok, qwen_tok):
        g = Grammar(tok, _eos(tok), descriptions=DESCS, limits=GrammarLimits(max_objects=4))
        seen = set()
        for seed in range(2):
            for p in _check(drive(g, tok, batch=4, max_new=60, seed=seed), g.limits, set(DESCS)):
                seen |= {o.desc for o in p.objects}
        assert seen, "no object produced"
    assert escaped('a "quoted" one') == b'a \\"quoted\\" one'


def test_processor_restarts_for_a_new_generate_call(tiny_grammar_tok):
    """One processor used for two generate calls: the second starts from the answer's first byte again."""
    tok = tiny_grammar_tok
    g = Grammar(tok, _eos(tok))
    proc = g.processor(20)
    ids = torch.zeros(2, 5, dtype=torch.long)
    first = proc(ids, torch.zeros(2, g.vocab_size))
    ids = torch.cat([ids, first.argmax(-1)[:, None]], 1)
    proc(ids, torch.zeros(2, g.vocab_size))
    again = proc(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, g.vocab_size))
    assert torch.equal(torch.isfinite(again), torch.isfinite(first))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(an untrained tiny checkpoint, the train JSONL it was built from)."""
    from coordexp.build_base.tiny import build_tiny

    data = write_dataset(tmp_path_factory.mktemp("data"), n=4)
    return build_tiny(data, tmp_path_factory.mktemp("tiny") / "base", **SMALL), data


def test_untrained_detector_parses_every_answer_when_constrained(tiny_checkpoint):
    from coordexp.core.config import EvaluateConfig
    from coordexp.core.contract import read_jsonl, record_to_json
    from coordexp.evaluate import grammar as grammar_mod
    from coordexp.evaluate.generate import Detector
    from coordexp.evaluate.metrics import summarize
    from coordexp.evaluate.stage import predict_records

    ckpt, jsonl = tiny_checkpoint
    det = Detector(ckpt, device="cpu")
    records = read_jsonl(jsonl)[:4]
    assert grammar_mod.for_detector(det, EvaluateConfig(decoding="free"), None) is None
    for descriptions in ("free", "train_set"):
        cfg = EvaluateConfig(decoding="constrained", descriptions=descriptions)
        g = grammar_mod.for_detector(det, cfg, jsonl)
        preds, parses, raw = predict_records(
            det, records, jsonl.parent, batch_size=2, max_new_tokens=40, grammar=g, desc="test"
        )
        assert summarize(parses, preds, [record_to_json(r) for r in records])["parse_rate"] == 1.0
        assert all(r["ok"] and not r["hit_limit"] for r in raw)
    # free decoding: no grammar processor, only the distribution capture (which never changes a token)
    calls = []
    real = det.model.generate

    def spy(*a, **kw):
        calls.append(kw["logits_processor"])
        return real(*a, **kw)

    det.model.generate = spy
    predict_records(det, records[:1], jsonl.parent, batch_size=1, max_new_tokens=8, grammar=None, desc="test")
    from coordexp.evaluate.generate import CoordCapture

    assert len(calls) == 1 and [type(p) for p in calls[0]] == [CoordCapture]


def test_predict_cli_decoding_flag(tiny_checkpoint, tmp_path, monkeypatch):
    """``coordexp predict --decoding free`` passes no processor; the default decodes under the grammar."""
    from PIL import Image

    from coordexp.cli import main
    from coordexp.evaluate.generate import Detector
    from coordexp.evaluate.grammar import GrammarProcessor

    seen = []
    real = Detector.generate

    def generate(self, rows, max_new_tokens, logits_processors=None):
        seen.append([type(p) for p in logits_processors or []])
        return real(self, rows, max_new_tokens, logits_processors)

    monkeypatch.setattr(Detector, "generate", generate)
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (200, 0, 0)).save(img)
    ckpt, _ = tiny_checkpoint
    base = ["predict", "--checkpoint", str(ckpt), "--max-new-tokens", "24"]
    assert main([*base, "--out", str(tmp_path / "c"), str(img)]) == 0
    assert main([*base, "--out", str(tmp_path / "f"), "--decoding", "free", str(img)]) == 0
    assert seen == [[GrammarProcessor], []]
    out = json.loads((tmp_path / "c" / "predictions.json").read_text())
    assert out["images"][0]["problems"] == []
    with pytest.raises(SystemExit):
        main([*base, "--decoding", "beam", str(img)])
