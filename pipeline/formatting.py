"""How a fraction is shown to people: one rule for tables, logs, progress lines and reports."""

from __future__ import annotations

import math


def percent(value, digits: int = 1) -> str:
    """0.8432 -> '84.3' (digits=2: '84.32'); '-' for a missing or NaN value."""
    if value is None or math.isnan(value):
        return "-"
    return f"{100 * float(value):.{digits}f}"
