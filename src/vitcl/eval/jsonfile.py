"""Strict JSON for every file a run writes. The JSON standard has no NaN or Infinity (`JSON.parse`, jq and most
non-Python readers refuse Python's bare `NaN`), so a value that is not a finite number, such as an accuracy not yet
measured, is written as null."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def strict(obj: Any) -> Any:
    """obj with every non-finite float replaced by None (in dicts, lists and tuples, recursively)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write_atomic(path: Path, obj: Any, indent: int | None = 1) -> None:
    """Write obj to path through a temporary file in the same folder, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(obj, indent))
    tmp.replace(path)
