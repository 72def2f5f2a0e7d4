"""Confidence scores for predicted objects, from the model's own token probabilities.

COCO mAP ranks detections by score, and a generative detector has no detection head that
outputs one. We use the probabilities the model gave to the coord tokens it actually emitted:

    score = exp(mean_i log p_i) = (prod_i p_i) ** (1 / n)

the geometric mean of the coord-token probabilities. Why this form:

* it is length-normalised, so a polygon with 12 coords is not punished against a box with 4
  (the plain product would be);
* it lies in (0, 1] and equals 1 only when every coord was certain, so it reads as a
  per-token confidence;
* it ranks confident localisations first: one uncertain coord (a flat distribution over
  bins) pulls the score down multiplicatively, which is what a wrong box usually looks like.

Probabilities are clipped at the smallest positive float before the log (a greedy-sampled
token can still have probability that underflows to 0), so the score is never 0 from
underflow alone. A non-finite or out-of-range probability gives score 0.0 and is reported,
so the caller can count it (``nan_scores`` in :func:`coordexp.evaluate.metrics.summarize`).

Token alignment contract (:func:`score_objects`): the caller passes, for every generated
step, the token *string* (``tokenizer.convert_ids_to_tokens(ids)``) and the probability of
the chosen token at that step, together with the parse of the *decoded* text (decoded
without stripping the coord tokens). Coord tokens are single, atomic vocabulary items
``<|coord_k|>``, so the i-th literal coord-token occurrence in the decoded text
(``ParseResult.coord_occurrences[i]``, also counting any inside a ``desc``) was produced by the
i-th generated step whose token string is a coord token. The helper checks this: an
occurrence whose bin differs from the generated token's bin, or that has no generated
counterpart, is unaligned and its object is left unscored (score 0.0, status ``"unscored"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordexp.core.codec import is_coord_token, parse_coord_token
from coordexp.evaluate.parse import ParseResult

_TINY = float(np.finfo(np.float64).tiny)


def object_score_checked(coord_token_probs: Sequence[float]) -> tuple[float, bool]:
    """``(score, valid)``: the geometric-mean score, and whether the input was usable.

    Invalid (score 0.0, ``valid=False``): empty input, or any probability that is not a
    finite number in ``[0, 1]``.
    """
    try:
        p = np.asarray(list(coord_token_probs), dtype=np.float64)
    except (TypeError, ValueError):
        return 0.0, False
    if p.ndim != 1 or p.size == 0 or not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        return 0.0, False
    s = float(np.exp(np.mean(np.log(np.clip(p, _TINY, 1.0)))))
    return min(max(s, _TINY), 1.0), True


def object_score(coord_token_probs: Sequence[float]) -> float:
    """Geometric mean of the coord-token probabilities, in (0, 1]; 0.0 for invalid input."""
    return object_score_checked(coord_token_probs)[0]


@dataclass(frozen=True)
class ObjectScores:
    """Per-object scores for one answer, parallel to ``ParseResult.objects``.

    ``status[i]`` is ``"ok"``, ``"nonfinite"`` (a probability was not a finite number in
    [0, 1]) or ``"unscored"`` (a coord had no aligned coord token: a plain-integer coord, or an
    alignment mismatch). Non-ok objects get score 0.0. ``aligned`` says the generated coord
    tokens and the text's coord-token occurrences agreed one to one (count and bins).
    """

    scores: tuple[float, ...]
    status: tuple[str, ...]
    aligned: bool

    @property
    def n_nonfinite(self) -> int:
        return sum(s == "nonfinite" for s in self.status)

    @property
    def n_unscored(self) -> int:
        return sum(s == "unscored" for s in self.status)


def score_objects(parse: ParseResult, tokens: Sequence[str], probs: Sequence[float]) -> ObjectScores:
    """Score each parsed object from per-generated-step ``(tokens[t], probs[t])``.

    See the module docstring for the alignment contract. ``tokens`` and ``probs`` must have
    the same length (the generated steps, prompt excluded).
    """
    if len(tokens) != len(probs):
        raise ValueError(f"{len(tokens)} tokens but {len(probs)} probabilities")
    gen = [(parse_coord_token(t), float(p)) for t, p in zip(tokens, probs) if is_coord_token(t)]
    occ = parse.coord_occurrences
    aligned = len(gen) == len(occ) and all(g[0] == o for g, o in zip(gen, occ))
    scores: list[float] = []
    status: list[str] = []
    for obj in parse.objects:
        ps: list[float] = []
        for b, ti in zip(obj.bins, obj.coord_token_indices):
            if ti is None or ti >= len(gen) or gen[ti][0] != b or ti >= len(occ) or occ[ti] != b:
                ps = []
                break
            ps.append(gen[ti][1])
        if not ps:
            scores.append(0.0)
            status.append("unscored")
            continue
        s, valid = object_score_checked(ps)
        scores.append(s)
        status.append("ok" if valid else "nonfinite")
    return ObjectScores(tuple(scores), tuple(status), aligned)


def build_prediction(
    image_id: int,
    width: float,
    height: float,
    parse: ParseResult,
    scores: ObjectScores | Sequence[float] | None = None,
) -> dict[str, object]:
    """A prediction record for :mod:`coordexp.evaluate.metrics`, in the data-contract shape.

    ``{"id", "width", "height", "objects": [{"desc", <kind>: [bins], "score",
    "score_status"}]}``; coords are bin integers. Without scores every object gets 1.0 (then
    mAP is order-of-answer dependent: only meaningful for F1-style metrics).
    """
    if scores is None:
        vals: Sequence[float] = [1.0] * len(parse.objects)
        stat: Sequence[str] = ["ok"] * len(parse.objects)
    elif isinstance(scores, ObjectScores):
        vals, stat = scores.scores, scores.status
    else:
        vals = list(scores)
        stat = ["ok" if isinstance(v, (int, float)) and math.isfinite(v) else "nonfinite" for v in vals]
    if len(vals) != len(parse.objects):
        raise ValueError(f"{len(vals)} scores for {len(parse.objects)} objects")
    objects: list[Mapping[str, object]] = []
    for obj, v, st in zip(parse.objects, vals, stat):
        d: dict[str, object] = obj.to_dict()
        d["score"] = float(v)
        d["score_status"] = st
        objects.append(d)
    return {"id": int(image_id), "width": width, "height": height, "objects": objects}
