"""Strict JSON: what gptcli writes parses with any JSON reader.

Python's `json` writes NaN and Infinity as bare `NaN`/`Infinity`, which are not JSON. gptcli writes
them as `null` instead (a diverged loss, an infinite perplexity)."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float, however deeply nested, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes NaN or Infinity (they become null)."""
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)
