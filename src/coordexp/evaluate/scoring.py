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

Other definitions from the same generation (the coord-vocab mass, the peak probability and the spread of the
captured coord distributions, and a geometric mean that includes the description tokens) are in
:data:`SCORES`; ``evaluate.score`` picks the one that ranks detections, and every one's AP is measured.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordexp.core.codec import is_coord_token, parse_coord_token
from coordexp.evaluate.parse import ParseResult
from coordexp.evaluate.readout import COL, column

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


@dataclass(frozen=True)
class ObjectSteps:
    """The generated steps behind one parsed object.

    ``coords[i]`` is the step that emitted the object's coord ``i``; ``coords`` is ``None`` when some coord
    has no aligned coord token (see the module docstring). ``desc`` lists the steps whose text overlaps the
    description's characters (empty when the token spans are unknown).
    """

    coords: tuple[int, ...] | None
    desc: tuple[int, ...] = ()


def object_steps(
    parse: ParseResult, tokens: Sequence[str], spans: Sequence[tuple[int, int]] | None = None
) -> list[ObjectSteps]:
    """Per parsed object, the generated steps of its coords and of its description (alignment contract above)."""
    gen = [(t, parse_coord_token(tok)) for t, tok in enumerate(tokens) if is_coord_token(tok)]
    occ = parse.coord_occurrences
    out: list[ObjectSteps] = []
    for obj in parse.objects:
        steps: list[int] | None = []
        for b, ti in zip(obj.bins, obj.coord_token_indices):
            if ti is None or ti >= len(gen) or gen[ti][1] != b or ti >= len(occ) or occ[ti] != b:
                steps = None
                break
            steps.append(gen[ti][0])
        desc: tuple[int, ...] = ()
        if spans is not None and obj.desc_span is not None:
            s0, s1 = obj.desc_span
            desc = tuple(t for t, (a, e) in enumerate(spans) if a < s1 and e > s0)
        out.append(ObjectSteps(tuple(steps) if steps else None, desc))
    return out


@dataclass(frozen=True)
class Evidence:
    """What a score definition sees of one object: the chosen-token probabilities of its coord steps and of its
    description steps, and the captured coord statistics of its coord steps (``[n, len(STAT_COLUMNS)]``, or
    ``None`` when nothing was captured)."""

    coord_probs: tuple[float, ...]
    desc_probs: tuple[float, ...]
    coord_stats: np.ndarray | None


def _stat_mean(ev: Evidence, column: str) -> float | None:
    if ev.coord_stats is None or ev.coord_stats.shape[0] == 0:
        return None
    return float(np.mean(ev.coord_stats[:, COL[column]]))


def _unit(v: float | None) -> tuple[float, str]:
    if v is None:
        return 0.0, "unscored"
    if not math.isfinite(v) or v < 0 or v > 1 + 1e-9:
        return 0.0, "nonfinite"
    return min(v, 1.0), "ok"


def _coord_geomean(ev: Evidence) -> tuple[float, str]:
    s, valid = object_score_checked(ev.coord_probs)
    return s, "ok" if valid else "nonfinite"


def _coord_mass(ev: Evidence) -> tuple[float, str]:
    return _unit(_stat_mean(ev, "mass"))


def _coord_peak(ev: Evidence) -> tuple[float, str]:
    return _unit(_stat_mean(ev, "peak"))


def _neg_spread(ev: Evidence) -> tuple[float, str]:
    sd = _stat_mean(ev, "std")
    return _unit(None if sd is None else 1.0 / (1.0 + sd) if math.isfinite(sd) and sd >= 0 else math.nan)


def _desc_coord_geomean(ev: Evidence) -> tuple[float, str]:
    if not ev.desc_probs:
        return 0.0, "unscored"
    s, valid = object_score_checked([*ev.desc_probs, *ev.coord_probs])
    return s, "ok" if valid else "nonfinite"


ScoreFn = Callable[[Evidence], tuple[float, str]]
SCORES: dict[str, ScoreFn] = {
    "coord_geomean": _coord_geomean,
    "coord_mass": _coord_mass,
    "coord_peak": _coord_peak,
    "neg_spread": _neg_spread,
    "desc_coord_geomean": _desc_coord_geomean,
}
"""Object score definitions, all from the one generation's captured numbers; each maps an object's
:class:`Evidence` to ``(score in [0, 1], status)``:

* ``coord_geomean`` (the default and headline): the geometric mean of the chosen coord tokens' full-vocab
  probabilities (module docstring);
* ``coord_mass``: the mean coord-vocab mass at the object's coord slots: how sure the model was that a
  coordinate belonged there at all, blind to where;
* ``coord_peak``: the mean peak probability of the renormalised coord slice: confidence in one bin, blind to
  how close the runners-up are;
* ``neg_spread``: ``1 / (1 + s)`` with ``s`` the mean standard deviation (in bins) of the coord slices: the
  localisation uncertainty itself, which a unimodal, ordinal distribution (Stage-1 training) makes meaningful.
  AP depends only on the order, so any decreasing map of ``s`` gives the same AP; ``1 / (1 + s)`` needs no
  scale, is 1 for a point mass and 1/2 at one bin of spread;
* ``desc_coord_geomean``: the geometric mean over the description tokens' and the coord tokens' chosen
  probabilities: a confident box with an unsure class name ranks lower.

A definition that needs what was not captured (statistics, token spans) leaves the object ``unscored``
(score 0.0)."""


def score_objects(
    parse: ParseResult,
    tokens: Sequence[str],
    probs: Sequence[float],
    *,
    score: str = "coord_geomean",
    stats: np.ndarray | None = None,
    steps: Sequence[ObjectSteps] | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
) -> ObjectScores:
    """Score each parsed object from per-generated-step ``(tokens[t], probs[t])`` (and ``stats[t]``).

    See the module docstring for the alignment contract. ``tokens`` and ``probs`` must have
    the same length (the generated steps, prompt excluded). ``score`` names a :data:`SCORES` definition;
    ``steps`` (from :func:`object_steps`) saves recomputing the alignment for several definitions.
    """
    if len(tokens) != len(probs):
        raise ValueError(f"{len(tokens)} tokens but {len(probs)} probabilities")
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; expected one of {', '.join(SCORES)}")
    fn = SCORES[score]
    gen = [parse_coord_token(t) for t in tokens if is_coord_token(t)]
    occ = parse.coord_occurrences
    aligned = len(gen) == len(occ) and all(g == o for g, o in zip(gen, occ))
    steps = list(steps) if steps is not None else object_steps(parse, tokens, spans)
    scores: list[float] = []
    status: list[str] = []
    for st in steps:
        if st.coords is None:
            scores.append(0.0)
            status.append("unscored")
            continue
        ev = Evidence(
            coord_probs=tuple(float(probs[t]) for t in st.coords),
            desc_probs=tuple(float(probs[t]) for t in st.desc),
            coord_stats=None if stats is None else np.asarray(stats)[list(st.coords)],
        )
        v, stat = fn(ev)
        scores.append(v)
        status.append(stat)
    return ObjectScores(tuple(scores), tuple(status), aligned)


def read_bins(
    bins: Sequence[int], coord_steps: Sequence[int] | None, readout: str, stats: np.ndarray | None
) -> list[int] | list[float]:
    """One object's coordinates under ``readout``: the emitted bins for ``argmax`` (integers), else the readout
    of the captured distribution at each coord's step (continuous bins, floats). Without an alignment or
    captured statistics the emitted bins stand (there is no distribution to read)."""
    if readout == "argmax":
        return [int(b) for b in bins]
    col = column(readout)
    if coord_steps is None or stats is None:
        return [float(b) for b in bins]
    st = np.asarray(stats)
    return [float(st[t, col]) for t in coord_steps]


def build_prediction(
    image_id: int,
    width: float,
    height: float,
    parse: ParseResult,
    scores: ObjectScores | Sequence[float] | None = None,
    *,
    readout: str = "argmax",
    stats: np.ndarray | None = None,
    steps: Sequence[ObjectSteps] | None = None,
) -> dict[str, object]:
    """A prediction record for :mod:`coordexp.evaluate.metrics`, in the data-contract shape.

    ``{"id", "width", "height", "objects": [{"desc", <kind>: [bins], "score",
    "score_status"}]}``; coords are bins: the emitted integers with ``readout="argmax"``, otherwise
    that readout of the captured ``stats`` at the object's coord ``steps`` (floats, see :func:`read_bins`).
    Without scores every object gets 1.0 (then mAP is order-of-answer dependent: only meaningful for
    F1-style metrics).
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
    for i, (obj, v, st) in enumerate(zip(parse.objects, vals, stat)):
        d: dict[str, object] = obj.to_dict()
        if readout != "argmax":
            d[obj.kind] = read_bins(obj.bins, steps[i].coords if steps is not None else None, readout, stats)
        d["score"] = float(v)
        d["score_status"] = st
        objects.append(d)
    return {"id": int(image_id), "width": width, "height": height, "objects": objects}
