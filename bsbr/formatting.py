"""Numbers as the reports print them: 3 significant digits, thousands separators, a unit, an interval.

    sig(6061.7)                                   # '6,060'
    quantity(6061.7, "ms")                        # '6,060 ms'
    with_interval(1.0, 0.9981, 1.0004, "×")       # '1.00× [0.998, 1.00]'

Significant digits are kept as digits (``1.00``, not ``1``) and no number between 1e-4 and 1e21 is printed in
scientific notation: Python's ``:.3g`` gives ``6.06e+03`` and ``1``, which a reader has to decode.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["quantity", "sig", "with_interval"]

#: Units written against the number ("1.00×", "12.5%"); every other unit follows a space ("6,060 ms").
ATTACHED_UNITS = ("×", "%")


def sig(value, digits: int = 3) -> str:
    """``value`` rounded to ``digits`` significant digits, trailing zeros kept; thousands separated by commas.

    ``sig(6061.7) == "6,060"``, ``sig(1) == "1.00"``, ``sig(0.99812) == "0.998"``, ``sig(123456) == "123,000"``,
    ``sig(0.000123) == "0.000123"``; below 1e-4 in magnitude: scientific, ``sig(1.234e-5) == "1.23e-05"``.
    Zero is ``"0"``, NaN and None ``"—"``, infinities ``"∞"`` / ``"-∞"``.

    Raises:
        TypeError: ``value`` is not a real number (``bool`` included) or None.
        ValueError: ``digits`` is not an integer >= 1.
    """
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be an integer >= 1, got {digits!r}")
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"value must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        return "—"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if value == 0:
        return "0"
    rounded = float(f"{value:.{digits - 1}e}")  # 999.6 -> 1000.0 at 3 digits: the exponent after rounding
    exponent = math.floor(math.log10(abs(rounded)))
    if exponent < -4:
        return f"{rounded:.{digits - 1}e}"
    if exponent >= digits - 1:
        return f"{rounded:,.0f}"
    return f"{rounded:.{digits - 1 - exponent}f}"


def _unit(text: str, unit: str) -> str:
    if not isinstance(unit, str):
        raise TypeError(f"unit must be a str, got {type(unit).__name__}")
    if not unit:
        return text
    return text + unit if unit in ATTACHED_UNITS else f"{text} {unit}"


def quantity(value, unit: str = "", digits: int = 3) -> str:
    """``value`` with :func:`sig` and its unit: ``quantity(6061.7, "ms") == "6,060 ms"``,
    ``quantity(4.157, "×") == "4.16×"`` ("×" and "%" attach to the number, other units follow a space).

    Raises TypeError / ValueError as :func:`sig`; TypeError if ``unit`` is not a str.
    """
    return _unit(sig(value, digits), unit)


def with_interval(value, low, high, unit: str = "", digits: int = 3) -> str:
    """A value, its unit and its interval: ``with_interval(6061.7, 6012, 6330.4, "ms") == "6,060 ms [6,010, 6,330]"``,
    ``with_interval(1.0, 0.9981, 1.0004, "×") == "1.00× [0.998, 1.00]"``.

    Raises:
        ValueError: ``low > high`` (both finite); as :func:`sig` otherwise.
        TypeError: as :func:`quantity`.
    """
    bounds = [sig(low, digits), sig(high, digits)]  # type-checks both first
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high) and low > high:
        raise ValueError(f"low must be <= high, got low={low!r}, high={high!r}")
    return f"{quantity(value, unit, digits)} [{bounds[0]}, {bounds[1]}]"
