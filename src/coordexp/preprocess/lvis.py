"""LVIS-format annotations: what ``preprocess`` keeps of them so that ``evaluate`` can score with the federated
protocol (``evaluate.metrics: lvis``, :func:`coordexp.evaluate.metrics.lvis_map`).

An LVIS file is a COCO instances file plus, per image, ``neg_category_ids`` (categories checked absent) and
``not_exhaustive_category_ids`` (categories whose instances are not all annotated), and per category a
``frequency`` group (``r`` rare, ``c`` common, ``f`` frequent), ``synonyms`` and ``def``; its images name their
file by ``coco_url`` (read as the URL's last part, no network). The format is detected from the file's own keys
(:func:`is_lvis`), so a real LVIS export needs no setting and a COCO file is never mistaken for one.

The contract records carry boxes and descriptions only, so the federated fields go beside them, in
``<out_dir>/<split>.lvis.json`` (:func:`coordexp.core.paths.lvis_fields_file`): the categories as the file lists them (ids, names as the
records' ``desc``, frequencies, synonyms, definitions) and, for every image kept, its two id lists. Images are
identified by the record ``id`` (the LVIS image id), so the sidecar and the JSONL join on it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from coordexp.core.errors import UserError

FREQUENCIES: tuple[str, ...] = ("r", "c", "f")
"""LVIS frequency groups, in the order of the ``lvis`` package's ``APr`` / ``APc`` / ``APf``."""

IMAGE_LISTS: tuple[str, ...] = ("neg_category_ids", "not_exhaustive_category_ids")
"""The per-image category-id lists of the federated protocol."""


class LvisFormatError(UserError, ValueError):
    """An LVIS file whose categories cannot be scored (no frequency group, two categories of one name)."""


def is_lvis(data: dict[str, Any]) -> bool:
    """True when the file carries LVIS's own keys: a category ``frequency`` or an image's federated id lists."""
    cats = (c for c in data["categories"] if isinstance(c, dict))
    imgs = (i for i in data["images"] if isinstance(i, dict))
    return any("frequency" in c for c in cats) or any(k in i for i in imgs for k in IMAGE_LISTS)


def check_categories(data: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """The categories of an LVIS file, each with an int ``id``, its ``name`` as the records' ``desc`` (stripped)
    and a ``frequency`` of ``r`` / ``c`` / ``f``; raises :class:`LvisFormatError` naming the first that is not."""
    out: list[dict[str, Any]] = []
    seen: dict[str, Any] = {}
    for i, c in enumerate(data["categories"]):
        where = f"{path}: categories[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not str(c.get("name") or "").strip():
            raise LvisFormatError(f"{where}: an LVIS category needs an int 'id' and a non-empty 'name'")
        name = str(c["name"]).strip()
        if c.get("frequency") not in FREQUENCIES:
            raise LvisFormatError(
                f"{where} (id {c['id']}, {name!r}): 'frequency' is {c.get('frequency')!r}; LVIS scores by "
                "frequency group and needs 'r', 'c' or 'f' (fix the file, or drop the LVIS keys to read it as COCO)"
            )
        if name in seen:
            raise LvisFormatError(
                f"{where} (id {c['id']}): the name {name!r} is also category id {seen[name]}; descriptions must "
                "name one category each"
            )
        seen[name] = c["id"]
        out.append({**c, "name": name})
    return out


def image_lists(img: dict[str, Any]) -> dict[str, list[int]] | str:
    """The image's ``neg_category_ids`` and ``not_exhaustive_category_ids``, or why they are unusable."""
    out: dict[str, list[int]] = {}
    for key in IMAGE_LISTS:
        ids = img.get(key)
        if not isinstance(ids, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
            return f"LVIS image entry needs '{key}' as a list of int category ids, got {ids!r}"
        out[key] = sorted(set(ids))
    return out


def sidecar(categories: list[dict[str, Any]], images: dict[int, dict[str, list[int]]], source: str) -> dict[str, Any]:
    """The ``<split>.lvis.json`` content: the categories and the federated lists of the images kept."""
    return {
        "format": "lvis",
        "source": source,
        "categories": categories,
        "images": [{"id": iid, **lists} for iid, lists in sorted(images.items())],
    }


def counts(categories: list[dict[str, Any]], images: dict[int, dict[str, list[int]]]) -> dict[str, Any]:
    """What the split's LVIS fields hold, for ``reports/preprocess_counts.json``."""
    freq = Counter(c["frequency"] for c in categories)
    return {
        "images": len(images),
        "categories": {f: freq.get(f, 0) for f in FREQUENCIES},
        **{key: sum(len(v[key]) for v in images.values()) for key in IMAGE_LISTS},
    }
