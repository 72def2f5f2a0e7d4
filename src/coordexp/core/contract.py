"""The JSONL data contract: one record per line, in pixel or coord-token mode.

A record::

    {"id": 7, "images": ["images/train/000007.png"], "width": 128, "height": 128,
     "objects": [{"desc": "red circle", "bbox_2d": ["<|coord_12|>", ...]}, ...]}

Each object carries ``desc`` and exactly one geometry: ``bbox_2d`` (x1, y1, x2, y2), ``poly``
(x, y pairs, at least 3 points) or ``line`` (x, y pairs, at least 2 points). In *pixel* mode the
values are numbers inside the image; in *coord* mode they are ``<|coord_k|>`` strings (the
codec maps between the two). Image paths are relative to the JSONL file's folder, and may not
escape it: a record that points at ``../../etc/passwd`` is a data error, not a feature.

Validation errors read ``file:line: field: what is wrong``; nothing is skipped silently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coordexp.core import codec, paths
from coordexp.core.errors import UserError
from coordexp.core.geometry import GEOMETRY_KEYS

Mode = Literal["pixel", "coord"]


class ContractError(UserError, ValueError):
    """A record that breaks the contract; the message names file, line and field."""


class ContractObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    desc: str = Field(min_length=1)
    bbox_2d: list[Any] | None = None
    poly: list[Any] | None = None
    line: list[Any] | None = None

    @field_validator("desc")
    @classmethod
    def _desc_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("desc is blank")
        return v

    @model_validator(mode="after")
    def _one_geometry(self) -> ContractObject:
        present = [k for k in GEOMETRY_KEYS if getattr(self, k) is not None]
        if len(present) != 1:
            raise ValueError(
                f"needs exactly one geometry of {', '.join(GEOMETRY_KEYS)}; found "
                f"{len(present)}{' (' + ', '.join(present) + ')' if present else ''}"
            )
        kind, values = present[0], getattr(self, present[0])
        n = len(values)
        if kind == "bbox_2d" and n != 4:
            raise ValueError(f"bbox_2d needs 4 values (x1, y1, x2, y2), got {n}")
        if kind == "poly" and (n < 6 or n % 2):
            raise ValueError(f"poly needs an even number >= 6 of values (x, y pairs), got {n}")
        if kind == "line" and (n < 4 or n % 2):
            raise ValueError(f"line needs an even number >= 4 of values (x, y pairs), got {n}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in GEOMETRY_KEYS if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any]:
        return getattr(self, self.kind)


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: int | None = None
    images: list[str] = Field(min_length=1, max_length=1)
    width: int = Field(gt=1)
    height: int = Field(gt=1)
    objects: list[ContractObject]

    @field_validator("images")
    @classmethod
    def _relative_inside(cls, v: list[str]) -> list[str]:
        for p in v:
            parts = Path(p).parts
            if not p or Path(p).is_absolute() or ".." in parts:
                raise ValueError(f"image path {p!r} must be relative to the JSONL folder and stay inside it")
        return v

    def check_mode(self, mode: Mode) -> None:
        """Check every geometry value against ``mode``; raise ``ValueError`` naming the field."""
        for i, obj in enumerate(self.objects):
            for j, v in enumerate(obj.values):
                where = f"objects.{i}.{obj.kind}.{j}"
                if mode == "coord":
                    if not codec.is_coord_token(v):
                        raise ValueError(f"{where}: expected a coord token like '<|coord_12|>', got {v!r}")
                else:
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                        raise ValueError(f"{where}: expected a finite pixel number, got {v!r}")
                    size = self.width if j % 2 == 0 else self.height
                    if not 0 <= v <= size:
                        axis = "x" if j % 2 == 0 else "y"
                        raise ValueError(f"{where}: {axis}={v} is outside the image [0, {size}]")
            if obj.kind == "bbox_2d":
                x1, y1, x2, y2 = obj.values if mode == "pixel" else [codec.parse_coord_token(t) for t in obj.values]
                if x2 < x1 or y2 < y1:
                    raise ValueError(f"objects.{i}.bbox_2d: x2 < x1 or y2 < y1 in {obj.values}")


def validate_record(data: Any, mode: Mode, where: str = "record") -> Record:
    """One record from already-parsed JSON; ``where`` (e.g. ``file:line``) prefixes errors."""
    if not isinstance(data, dict):
        raise ContractError(f"{where}: a record must be a JSON object, got {type(data).__name__}")
    try:
        rec = Record.model_validate(data)
        rec.check_mode(mode)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "record"
        more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise ContractError(f"{where}: {field}: {first['msg']}{more}") from None
    except ValueError as exc:
        raise ContractError(f"{where}: {exc}") from None
    return rec


def iter_jsonl(path: str | Path, mode: Mode = "coord") -> Iterator[Record]:
    """Validated records of a contract JSONL file; the first bad line raises ``ContractError``."""
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path}: no such file; run the preprocess stage (dvc repro preprocess)")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ContractError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            yield validate_record(data, mode, where=f"{path}:{lineno}")


def read_jsonl(path: str | Path, mode: Mode = "coord", *, allow_empty: bool = False) -> list[Record]:
    records = list(iter_jsonl(path, mode))
    if not records and not allow_empty:
        raise ContractError(f"{path}: no records; the split is empty (check the preprocess rejects file)")
    return records


def image_path(record: Record, jsonl_path: str | Path) -> Path:
    """Absolute path of a record's image; refuses paths that escape the JSONL folder, symlinks included
    (:class:`coordexp.core.paths.PathEscapeError`)."""
    return paths.inside(Path(jsonl_path).parent, record.images[0], where=f"{jsonl_path}: record {record.id}: image")


def to_coord_mode(record: Record) -> Record:
    """Pixel-mode record -> coord-token record (through the codec)."""
    objs = [{"desc": o.desc, o.kind: codec.encode_xy(o.values, record.width, record.height)} for o in record.objects]
    return Record.model_validate({**record.model_dump(exclude={"objects"}), "objects": objs})


def to_pixel_mode(record: Record) -> Record:
    """Coord-token record -> pixel-mode record (bin centres)."""
    objs = [{"desc": o.desc, o.kind: codec.decode_xy(o.values, record.width, record.height)} for o in record.objects]
    return Record.model_validate({**record.model_dump(exclude={"objects"}), "objects": objs})


def record_to_json(record: Record) -> dict[str, Any]:
    return record.model_dump(mode="json", exclude_none=True)


def render_answer(objects: list[ContractObject] | list[dict[str, Any]]) -> str:
    """The assistant's answer: one JSON object ``{"object_1": {"desc": ..., "<geometry>": [...]}, ...}``.

    Used by training and by the evaluation parser's tests, so the two never drift apart.
    """
    body: dict[str, Any] = {}
    for i, obj in enumerate(objects, start=1):
        o = obj if isinstance(obj, ContractObject) else ContractObject.model_validate(obj)
        body[f"object_{i}"] = {"desc": o.desc, o.kind: list(o.values)}
    return json.dumps(body, ensure_ascii=False)
