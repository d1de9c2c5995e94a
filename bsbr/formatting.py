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

import numpy

__all__ = ["cell", "html_table", "quantity", "router_words", "sig", "with_interval"]

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


def cell(value, digits: int = 3, missing: str = "—") -> str:
    """One table cell as the reports print it: floats with :func:`sig`, integers in full with thousands separators
    (``cell(40960) == "40,960"``: a count is not rounded), booleans as ``yes`` / ``no``, strings unchanged; NaN,
    None and pandas' missing values as ``missing`` (the reports never print ``NaN``).

    Raises:
        ValueError: ``digits`` as :func:`sig`.
        TypeError: ``missing`` is not a str.
    """
    if not isinstance(missing, str):
        raise TypeError(f"missing must be a str, got {type(missing).__name__}")
    if value is None or (isinstance(value, float) and math.isnan(value)) or _is_pandas_missing(value):
        return missing
    if isinstance(value, (bool, numpy.bool_)):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        return sig(value, digits)
    return str(value)


def _is_pandas_missing(value) -> bool:
    try:
        import pandas
    except ImportError:  # pragma: no cover - pandas is a dependency
        return False
    return value is pandas.NA or value is pandas.NaT


def html_table(frame, digits: int = 3, missing: str = "—", index: bool = False) -> str:
    """A pandas DataFrame as an HTML ``<table>`` with every cell through :func:`cell` (3 significant digits, counts
    in full, missing values as ``missing``); the column names and index are escaped, the cells too. A float column
    of whole numbers with a missing value (a count column that the missing value made float) prints as integers.

    Args:
        frame: ``pandas.DataFrame`` (any shape; an empty frame gives a table with its header only).
        digits: significant digits of float cells.
        missing: what a NaN / None / missing cell shows, e.g. ``"not reached"``.
        index: whether to print the row index as the first column.

    Raises:
        TypeError: ``frame`` is not a DataFrame; ``missing`` is not a str.
        ValueError: ``digits`` as :func:`sig`.
    """
    import pandas

    if not isinstance(frame, pandas.DataFrame):
        raise TypeError(f"frame must be a pandas DataFrame, got {type(frame).__name__}")
    cell(0.0, digits, missing)  # checks digits and missing once, also for an empty frame
    shown = frame.astype(object).apply(lambda column: column.map(
        lambda value: cell(_as_count(value) if _is_count_column(column) else value, digits, missing)))
    return shown.to_html(index=index, border=0, escape=True)


def _is_count_column(column) -> bool:
    """A column of whole-number floats with a missing value: a count that the missing value turned into float,
    printed in full, not rounded to 3 digits (``seq_len`` 40,960, not 41,000). Without a missing value a float
    column stays a measurement (an r² of exactly 1.0 reads 1.00)."""
    values = [v for v in column if isinstance(v, float) and math.isfinite(v)]
    missing = [v for v in column if v is None or _is_pandas_missing(v) or (isinstance(v, float) and math.isnan(v))]
    others = [v for v in column if not isinstance(v, float) and not _is_pandas_missing(v) and v is not None]
    return bool(values) and bool(missing) and not others and all(v == int(v) for v in values)


def _as_count(value):
    return int(value) if isinstance(value, float) and math.isfinite(value) else value


def router_words(method: str) -> str:
    """A block router of report 04 (``bsbr.router_recall`` method names) in words, as report 04, the index and
    README write it: ``minmax_p8_head`` -> ``min/max keys (Quest), 8-token pages, per head``,
    ``mean_p8_group`` -> ``mean keys, 8-token pages, per group`` (a part it does not know is kept as it is)."""
    parts = method.split("_")
    words = ["min/max keys (Quest)" if parts[0] == "minmax" else "mean keys" if parts[0] == "mean" else parts[0]]
    words += [f"{p[1:]}-token pages" if p.startswith("p") and p[1:].isdigit() else f"per {p}" for p in parts[1:]]
    return ", ".join(words)
