"""Tests for the answer parser and the token-probability scores."""

from __future__ import annotations

import json
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordexp.core.codec import coord_token, is_coord_token
from coordexp.evaluate import (
    ParseResult,
    build_prediction,
    object_score,
    object_score_checked,
    parse_prediction,
    score_objects,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OBJS = [
    {"desc": "red circle", "bbox_2d": [12, 34, 56, 78]},
    {"desc": "blue triangle", "poly": [100, 200, 300, 400, 500, 100]},
    {"desc": "green line", "line": [0, 999, 999, 0]},
]


def render(objs: list[dict], sep: str = ", ") -> tuple[str, list[int]]:
    """The answer text for ``objs`` and the end offset (after '}') of each object value."""
    parts = ["{"]
    ends: list[int] = []
    for i, o in enumerate(objs):
        if i:
            parts.append(sep)
        kind = next(k for k in o if k != "desc")
        body = {"desc": o["desc"], kind: [coord_token(b) for b in o[kind]]}
        parts.append(f'"object_{i + 1}": ' + json.dumps(body, ensure_ascii=False))
        ends.append(len("".join(parts)))
    parts.append("}")
    return "".join(parts), ends


def kinds(r: ParseResult) -> set[str]:
    return {p.kind for p in r.problems}


# --- valid answers ---------------------------------------------------------------------


def test_valid_answer_parses_cleanly_with_spans() -> None:
    text, _ = render(OBJS)
    r = parse_prediction(text)
    assert r.ok and r.complete and not r.salvaged and r.problems == []
    assert [(o.desc, o.kind, list(o.bins)) for o in r.objects] == [
        (o["desc"], next(k for k in o if k != "desc"), o[next(k for k in o if k != "desc")]) for o in OBJS
    ]
    assert [o.index for o in r.objects] == [0, 1, 2]
    assert [o.key for o in r.objects] == ["object_1", "object_2", "object_3"]
    flat = [b for o in r.objects for b in o.bins]
    assert list(r.coord_occurrences) == flat
    assert [i for o in r.objects for i in o.coord_token_indices] == list(range(len(flat)))
    for o in r.objects:
        for b, (s, e) in zip(o.bins, o.coord_spans):
            assert text[s:e] == coord_token(b)
    assert r.objects[0].to_dict() == {"desc": "red circle", "bbox_2d": [12, 34, 56, 78]}


def test_empty_object_and_whitespace_are_fine() -> None:
    assert parse_prediction("{}").ok
    assert parse_prediction("  \n{ }\n ").ok
    text, _ = render(OBJS)
    r = parse_prediction("\n  " + text.replace(", ", ",\n  ") + "\n")
    assert r.ok and len(r.objects) == 3


def test_surrounding_text_is_tolerated_but_not_clean() -> None:
    text, _ = render(OBJS)
    r = parse_prediction("```json\n" + text + "\n```")
    assert not r.ok and r.salvaged and len(r.objects) == 3
    assert r.problem_counts() == {"extra_text": 2}


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ('{"object_1": 5}', "not_an_object"),
        ('{"object_1": ["a"]}', "not_an_object"),
        ('{"object_1": {"desc": "a"}}', "no_geometry"),
        (
            '{"object_1": {"desc": "a", "bbox_2d": ["<|coord_1|>","<|coord_1|>","<|coord_1|>","<|coord_1|>"], '
            '"line": ["<|coord_1|>","<|coord_1|>","<|coord_1|>","<|coord_1|>"]}}',
            "multiple_geometries",
        ),
        ('{"object_1": {"desc": "a", "bbox_2d": ["<|coord_1|>","<|coord_1|>","<|coord_1|>"]}}', "bad_coord_count"),
        (
            '{"object_1": {"desc": "a", "poly": ["<|coord_1|>","<|coord_1|>","<|coord_1|>","<|coord_1|>"]}}',
            "bad_coord_count",
        ),
        ('{"object_1": {"desc": "a", "line": ["<|coord_1|>","<|coord_1|>","<|coord_1|>"]}}', "bad_coord_count"),
        (
            '{"object_1": {"desc": "a", "bbox_2d": ["<|coord_1|>","<|coord_1000|>","<|coord_1|>","<|coord_1|>"]}}',
            "bad_coord_token",
        ),
        (
            '{"object_1": {"desc": "a", "bbox_2d": ["<|coord_1|>","<|coord_01|>","<|coord_1|>","<|coord_1|>"]}}',
            "bad_coord_token",
        ),
        (
            '{"object_1": {"desc": "a", "bbox_2d": ["<|coord_1|>", 1.5, "<|coord_1|>","<|coord_1|>"]}}',
            "bad_coord_token",
        ),
        (
            '{"object_1": {"desc": "a", "bbox_2d": ["<|coord_1|>", 1000, "<|coord_1|>","<|coord_1|>"]}}',
            "bad_coord_token",
        ),
        (
            '{"object_1": {"desc": "a", "bbox_2d": ["<|coord_1|>", true, "<|coord_1|>","<|coord_1|>"]}}',
            "bad_coord_token",
        ),
        ('{"object_1": {"desc": "a", "bbox_2d": "<|coord_1|>"}}', "bad_geometry"),
        ('{"object_1": {"bbox_2d": ["<|coord_1|>","<|coord_1|>","<|coord_1|>","<|coord_1|>"]}}', "missing_desc"),
        (
            '{"object_1": {"desc": " ", "bbox_2d": ["<|coord_1|>","<|coord_1|>","<|coord_1|>","<|coord_1|>"]}}',
            "missing_desc",
        ),
        ('{"object_1": {"desc": 3, "bbox_2d": ["<|coord_1|>","<|coord_1|>","<|coord_1|>","<|coord_1|>"]}}', "bad_desc"),
        (
            '{"object_1": {"desc": "a", "desc": "b", "bbox_2d": ["<|coord_1|>","<|coord_1|>","<|coord_1|>",'
            '"<|coord_1|>"]}}',
            "duplicate_field",
        ),
    ],
)
def test_rejected_objects(body: str, kind: str) -> None:
    good = '"object_2": {"desc": "ok", "bbox_2d": ["<|coord_1|>","<|coord_2|>","<|coord_3|>","<|coord_4|>"]}'
    r = parse_prediction(body[:-1] + ", " + good + "}")
    assert kind in kinds(r), r.problems
    assert not r.ok and r.complete
    assert [o.desc for o in r.objects] == ["ok"]  # the bad one is rejected, the good one kept
    assert r.n_members == 2 and r.n_rejected == 1
    assert all(p.object_index == 0 for p in r.problems)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ('{"object_1": {"desc": "a", "bbox_2d": [1, "<|coord_2|>", 3, 4]}}', "plain_int_coord"),
        (
            '{"object_1": {"desc": "a", "bbox_2d": ["<|coord_1|>","<|coord_2|>","<|coord_3|>","<|coord_4|>"], '
            '"score": 1}}',
            "unknown_field",
        ),
        ('{"obj": {"desc": "a", "bbox_2d": ["<|coord_1|>","<|coord_2|>","<|coord_3|>","<|coord_4|>"]}}', "bad_key"),
    ],
)
def test_accepted_with_problem(body: str, kind: str) -> None:
    r = parse_prediction(body)
    assert kinds(r) == {kind} and not r.ok and r.salvaged
    assert len(r.objects) == 1 and r.objects[0].bins == (1, 2, 3, 4)


def test_plain_int_coords_have_spans_but_no_token_index() -> None:
    text = '{"object_1": {"desc": "a", "bbox_2d": [17, "<|coord_2|>", 345, "<|coord_4|>"]}}'
    o = parse_prediction(text).objects[0]
    assert o.coord_token_indices == (None, 0, None, 1)
    assert [text[s:e] for s, e in o.coord_spans] == ["17", "<|coord_2|>", "345", "<|coord_4|>"]


def test_duplicate_keys_keep_both_objects() -> None:
    one = '"object_1": {"desc": "a", "bbox_2d": ["<|coord_1|>","<|coord_2|>","<|coord_3|>","<|coord_4|>"]}'
    r = parse_prediction("{" + one + ", " + one + "}")
    assert kinds(r) == {"duplicate_key"} and len(r.objects) == 2


def test_escaped_strings() -> None:
    text = (
        '{"object_1": {"desc": "caf\\u00e9 \\"x\\" <|coord_7|>", '
        '"bbox_2d": ["<\\u007ccoord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]}}'
    )
    r = parse_prediction(text)
    assert r.ok, r.problems
    o = r.objects[0]
    assert o.desc == 'café "x" <|coord_7|>'
    assert o.bins == (1, 2, 3, 4)
    # the escaped coord is not a literal token in the text; the desc's token is occurrence 0
    assert r.coord_occurrences == (7, 2, 3, 4)
    assert o.coord_token_indices == (None, 1, 2, 3)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("", "no_json"),
        ("   ", "no_json"),
        ("no json here", "no_json"),
        ('{"object_1": {"desc": "a",, }}', "invalid_json"),
        ('{"object_1" {"desc": "a"}}', "invalid_json"),
        ("{'object_1': 1}", "invalid_json"),
        ('{"object_1": {"desc": "a", "bbox_2d": [', "truncated"),
        ("{", "truncated"),
        ("[" * 5000 + "{" + '"a":' + "[" * 5000, "invalid_json"),
    ],
)
def test_bad_json(text: str, kind: str) -> None:
    r = parse_prediction(text)
    assert kind in kinds(r) and not r.ok and not r.complete and r.objects == []


def test_non_string_input_does_not_raise() -> None:
    r = parse_prediction(None)
    assert not r.ok and kinds(r) == {"no_json"}


# --- truncation and fuzzing ------------------------------------------------------------


def test_every_truncation_prefix_salvages_exactly_the_complete_objects() -> None:
    text, ends = render(OBJS)
    full = [o.to_dict() for o in parse_prediction(text).objects]
    for cut in range(len(text) + 1):
        r = parse_prediction(text[:cut])
        n_done = sum(e <= cut for e in ends)
        assert [o.to_dict() for o in r.objects] == full[:n_done], cut
        if cut < len(text):
            assert not r.ok and kinds(r) <= {"truncated", "no_json"}
        else:
            assert r.ok


coord_bins = st.integers(0, 999)
descs = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: bool(s.strip())
)
objects = st.one_of(
    st.builds(lambda d, b: {"desc": d, "bbox_2d": b}, descs, st.lists(coord_bins, min_size=4, max_size=4)),
    st.builds(
        lambda d, b: {"desc": d, "poly": b},
        descs,
        st.lists(coord_bins, min_size=6, max_size=16).filter(lambda v: len(v) % 2 == 0),
    ),
    st.builds(
        lambda d, b: {"desc": d, "line": b},
        descs,
        st.lists(coord_bins, min_size=4, max_size=10).filter(lambda v: len(v) % 2 == 0),
    ),
)


@FAST
@given(st.lists(objects, max_size=5), st.sampled_from([", ", ",", ",\n  "]), st.data())
def test_generated_answers_roundtrip_and_every_prefix_salvages(objs: list[dict], sep: str, data: st.DataObject) -> None:
    text, ends = render(objs, sep)
    r = parse_prediction(text)
    assert r.ok, r.problems
    assert [o.to_dict() for o in r.objects] == objs
    assert json.loads(text) == {
        f"object_{i + 1}": {k: ([coord_token(b) for b in v] if k != "desc" else v) for k, v in o.items()}
        for i, o in enumerate(objs)
    }
    cut = data.draw(st.integers(0, len(text)))
    rp = parse_prediction(text[:cut])
    assert [o.to_dict() for o in rp.objects] == objs[: sum(e <= cut for e in ends)]


def _check_invariants(r: ParseResult, text: str) -> None:
    assert isinstance(r, ParseResult)
    assert "internal_error" not in kinds(r), r.problems  # the catch-all must never be needed
    assert r.ok == (r.complete and not r.problems)
    assert sum(r.problem_counts().values()) == len(r.problems)
    for o in r.objects:
        n = len(o.bins)
        assert (n == 4) if o.kind == "bbox_2d" else (n % 2 == 0 and n >= (6 if o.kind == "poly" else 4))
        assert all(0 <= b <= 999 for b in o.bins)
        assert len(o.coord_spans) == len(o.coord_token_indices) == n
        for b, (s, e), ti in zip(o.bins, o.coord_spans, o.coord_token_indices):
            if ti is not None:
                assert text[s:e] == coord_token(b) and r.coord_occurrences[ti] == b
        assert o.desc.strip()


@FAST
@given(st.text(max_size=300))
def test_random_text_never_raises(text: str) -> None:
    _check_invariants(parse_prediction(text), text)


@FAST
@given(st.text(alphabet='{}[]":,<|>_coord0123456789 \\u', max_size=200))
def test_json_ish_text_never_raises(text: str) -> None:
    _check_invariants(parse_prediction(text), text)


@FAST
@given(st.data())
def test_mutated_answers_never_raise(data: st.DataObject) -> None:
    text, _ = render(OBJS)
    chars = list(text)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["del", "ins", "rep"]))
        i = data.draw(st.integers(0, max(len(chars) - 1, 0)))
        ch = data.draw(st.sampled_from(list('{}[]":,0129<|> x\\')))
        if op == "del" and chars:
            del chars[i]
        elif op == "ins":
            chars.insert(i, ch)
        elif chars:
            chars[i] = ch
    mutated = "".join(chars)
    r = parse_prediction(mutated)
    _check_invariants(r, mutated)
    try:
        ref = json.loads(mutated)
    except ValueError:
        ref = None
    if r.ok:  # a clean parse must agree with json.loads
        assert isinstance(ref, dict) and len(ref) == len(r.objects)


# --- scoring ---------------------------------------------------------------------------


def test_object_score_formula() -> None:
    assert object_score([0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5, abs=1e-15)
    assert object_score([1.0, 0.25]) == pytest.approx(0.5, abs=1e-15)
    assert object_score([0.9, 0.8, 0.7, 0.6]) == pytest.approx((0.9 * 0.8 * 0.7 * 0.6) ** 0.25, rel=1e-12)
    assert object_score([1.0] * 4) == 1.0
    # a zero probability is clipped, not log(0): tiny but positive, below any real score
    s0 = object_score([0.0, 1.0, 1.0, 1.0])
    assert 0.0 < s0 < 1e-70
    # length-normalised: same per-token confidence, same score, whatever the count
    assert object_score([0.8] * 4) == pytest.approx(object_score([0.8] * 12), rel=1e-12)


@pytest.mark.parametrize("probs", [[], [math.nan, 0.5], [math.inf], [0.5, -0.1], [1.5], ["x"]])
def test_object_score_invalid_input(probs: list) -> None:
    assert object_score(probs) == 0.0
    assert object_score_checked(probs) == (0.0, False)


def _tokens_of(text: str) -> list[str]:
    """Split text the way a tokenizer with atomic coord tokens would (other text: 1 char/token)."""
    out: list[str] = []
    pos = 0
    for m in re.finditer(r"<\|coord_\d+\|>", text):
        if not is_coord_token(m.group(0)):
            continue
        out.extend(text[pos : m.start()])
        out.append(m.group(0))
        pos = m.end()
    out.extend(text[pos:])
    return out


def test_score_objects_aligns_ith_coord_token() -> None:
    text, _ = render(
        [{"desc": "has <|coord_5|> inside", "bbox_2d": [1, 2, 3, 4]}, {"desc": "b", "line": [10, 20, 30, 40]}]
    )
    toks = _tokens_of(text)
    assert "".join(toks) == text
    coord_p = iter([0.9, 0.5, 0.5, 0.5, 0.5, 0.8, 0.8, 0.8, 0.8])  # first is the desc's token
    probs = [next(coord_p) if is_coord_token(t) else 0.99 for t in toks]
    r = parse_prediction(text)
    sc = score_objects(r, toks, probs)
    assert sc.aligned and sc.status == ("ok", "ok")
    assert sc.scores == pytest.approx((0.5, 0.8), rel=1e-12)
    pred = build_prediction(7, 640, 480, r, sc)
    assert pred["id"] == 7 and [o["score"] for o in pred["objects"]] == list(sc.scores)
    assert pred["objects"][1] == {"desc": "b", "line": [10, 20, 30, 40], "score": sc.scores[1], "score_status": "ok"}


def test_score_objects_misalignment_and_bad_probs() -> None:
    text, _ = render([{"desc": "a", "bbox_2d": [1, 2, 3, 4]}, {"desc": "b", "bbox_2d": [5, 6, 7, 8]}])
    toks = _tokens_of(text)
    r = parse_prediction(text)
    probs = [0.5] * len(toks)
    # a wrong bin in the generated stream for object 2: only object 2 is unscored
    bad = [coord_token(9) if t == coord_token(7) else t for t in toks]
    sc = score_objects(r, bad, probs)
    assert not sc.aligned and sc.status == ("ok", "unscored") and sc.scores[1] == 0.0 and sc.n_unscored == 1
    # fewer generated coord tokens than in the text (text decoded from elsewhere)
    sc = score_objects(r, toks[: toks.index(coord_token(6))], probs[: toks.index(coord_token(6))])
    assert not sc.aligned and sc.status == ("ok", "unscored")
    # a NaN probability on object 1
    nanp = [math.nan if t == coord_token(2) else p for t, p in zip(toks, probs)]
    sc = score_objects(r, toks, nanp)
    assert sc.status == ("nonfinite", "ok") and sc.scores[0] == 0.0 and sc.n_nonfinite == 1
    with pytest.raises(ValueError):
        score_objects(r, toks, probs[:-1])


def test_plain_int_objects_are_unscored() -> None:
    text = '{"object_1": {"desc": "a", "bbox_2d": [1, 2, 3, 4]}}'
    r = parse_prediction(text)
    sc = score_objects(r, list(text), [0.5] * len(text))
    assert sc.status == ("unscored",) and sc.aligned
