"""bsbr.formatting: 3 significant digits without scientific notation, units, intervals (report 03's numbers)."""

import re

import numpy as np
import pandas as pd
import pytest

from bsbr.formatting import quantity, sig, with_interval


@pytest.mark.parametrize("value, expected", [
    (6061.7, "6,060"), (6055.0, "6,060"), (1462.3, "1,460"), (123456, "123,000"), (999.6, "1,000"), (100, "100"),
    (123.4, "123"), (29.46, "29.5"), (1.1, "1.10"), (1, "1.00"), (1.0004, "1.00"), (0.99812, "0.998"),
    (0.0123, "0.0123"), (0.000123, "0.000123"), (0.00009996, "0.000100"), (1.234e-5, "1.23e-05"),
    (-6061.7, "-6,060"), (-0.5, "-0.500"), (0, "0"), (0.0, "0"), (2.5e21, "2,500,000,000,000,000,000,000"),
    (float("nan"), "—"), (None, "—"), (float("inf"), "∞"), (float("-inf"), "-∞"),
    (np.float64(4.157), "4.16"), (np.int64(40960), "41,000"), (np.float32(0.5), "0.500"),
])
def test_sig_three_digits(value, expected):
    assert sig(value) == expected


@pytest.mark.parametrize("value, digits, expected", [(6061.7, 4, "6,062"), (6061.7, 2, "6,100"), (0.99812, 1, "1"),
                                                     (1.5, 1, "2"), (0.25, 2, "0.25"), (3.14159, 6, "3.14159")])
def test_sig_other_digits(value, digits, expected):
    assert sig(value, digits) == expected


def test_report_03_numbers():
    """What report 03 printed as '6.06e+03 ms [6.01e+03, 6.33e+03]', '1.46e+03 ms' and '1× [1, 1]'."""
    assert with_interval(6061.7, 6012.0, 6330.4, "ms") == "6,060 ms [6,010, 6,330]"
    assert quantity(1462.3, "ms") == "1,460 ms"
    assert with_interval(1.0, 1.0, 1.0, "×") == "1.00× [1.00, 1.00]"
    assert with_interval(1.0, 0.9981, 1.0004, "×") == "1.00× [0.998, 1.00]"
    assert with_interval(1.0833, 1.06, 1.1, "×") == "1.08× [1.06, 1.10]"
    assert with_interval(27.13, 25.9, 28.41) == "27.1 [25.9, 28.4]"
    assert quantity(4.157, "×") == "4.16×" and quantity(12.5, "%") == "12.5%" and quantity(484.2, "MiB") == "484 MiB"


def test_pandas_row_values():
    row = pd.DataFrame({"ppl": [13.719], "low": [13.2], "high": [14.3]}).iloc[0]
    assert with_interval(row.ppl, row.low, row.high) == "13.7 [13.2, 14.3]"
    assert with_interval(row.ppl, float("nan"), row.high) == "13.7 [—, 14.3]"


@pytest.mark.parametrize("call, error, match", [
    (lambda: sig("6060"), TypeError, "value must be a real number, got str"),
    (lambda: sig(True), TypeError, "value must be a real number, got bool"),
    (lambda: sig(1.0, 0), ValueError, "digits must be an integer >= 1, got 0"),
    (lambda: sig(1.0, 2.0), ValueError, "digits must be an integer >= 1, got 2.0"),
    (lambda: quantity(1.0, None), TypeError, "unit must be a str, got NoneType"),
    (lambda: with_interval(1.0, 1.1, 0.9, "×"), ValueError, "low must be <= high, got low=1.1, high=0.9"),
    (lambda: with_interval(1.0, "0.9", 1.1), TypeError, "value must be a real number, got str"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cell_formats_each_kind_and_never_prints_nan():
    from bsbr.formatting import cell

    assert cell(0.123456) == "0.123"
    assert cell(np.float32(6061.7)) == "6,060"
    assert cell(40960) == "40,960"  # a count is not rounded
    assert cell(np.int64(188743680)) == "188,743,680"
    assert cell(True) == "yes" and cell(np.bool_(False)) == "no"
    assert cell("x") == "x"
    for missing in (None, float("nan"), np.nan, pd.NA):
        assert cell(missing) == "—"
        assert cell(missing, missing="not reached") == "not reached"
    with pytest.raises(TypeError, match="missing"):
        cell(1.0, missing=None)
    with pytest.raises(ValueError, match="digits"):
        cell(1.0, digits=0)


def test_html_table_formats_cells_counts_and_missing_values():
    from bsbr.formatting import html_table

    frame = pd.DataFrame({"seq_len": [2048.0, 40960.0, np.nan], "ratio": [1.0, 0.0079312, np.nan],
                          "name": ["a<b", "c", None]})
    cells = re.findall(r"<td>(.*?)</td>", html_table(frame, missing="not measured"))
    assert cells == ["2,048", "1.00", "a&lt;b", "40,960", "0.00793", "c", "not measured", "not measured", "not measured"]
    assert "NaN" not in html_table(frame) and "nan" not in html_table(frame)
    header = re.findall(r"<th>(.*?)</th>", html_table(frame, index=False))
    assert header == ["seq_len", "ratio", "name"]
    assert html_table(frame.iloc[:0]).count("<td>") == 0
    measured = pd.DataFrame({"r2": [1.0, 1.0], "seq_len": [1024, 2048]})  # whole floats, nothing missing: measured
    assert re.findall(r"<td>(.*?)</td>", html_table(measured)) == ["1.00", "1,024", "1.00", "2,048"]
    with pytest.raises(TypeError, match="frame"):
        html_table(frame.to_dict())
    with pytest.raises(ValueError, match="digits"):
        html_table(frame, digits=0)
