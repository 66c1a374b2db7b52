"""The parity arithmetic: relative error, Gram matrices, the table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stylize.model.parity import ParityRow, compare, format_table, gram, relative_error, worst


def test_relative_error_is_max_abs_difference_over_max_abs_reference():
    reference = np.array([1.0, -4.0, 2.0])
    assert relative_error(reference, np.array([1.0, -4.0, 2.02])) == pytest.approx(0.02 / 4.0)
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(np.zeros(3), np.ones(3)) == math.inf
    assert math.isnan(relative_error(reference, np.array([1.0, np.nan, 2.0])))


def test_gram_is_channel_correlation_over_positions():
    features = np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3)
    flat = features.reshape(2, 6).astype(np.float64)
    np.testing.assert_allclose(gram(features)[0], flat @ flat.T / 6)
    assert gram(features).dtype == np.float64


def test_compare_gives_features_and_gram_rows_per_layer():
    rng = np.random.default_rng(0)
    reference = {name: rng.random((1, 4, 5, 5), dtype=np.float32) for name in ("relu1_1", "relu2_1")}
    candidate = {**reference, "relu2_1": reference["relu2_1"] * 1.001}
    rows = compare(reference, candidate)
    assert [(r.layer, r.quantity) for r in rows] == [
        ("relu1_1", "features"),
        ("relu1_1", "gram"),
        ("relu2_1", "features"),
        ("relu2_1", "gram"),
    ]
    assert rows[0].relative_error == 0.0 and rows[1].relative_error == 0.0
    assert rows[2].relative_error == pytest.approx(1e-3, rel=1e-3)
    assert rows[3].relative_error == pytest.approx(1.001**2 - 1, rel=1e-3)
    assert worst(rows) == rows[3].relative_error


def test_compare_rejects_missing_or_misshapen_layers():
    reference = {"relu1_1": np.zeros((1, 2, 3, 3), np.float32)}
    with pytest.raises(ValueError, match="candidate lacks layer 'relu1_1'"):
        compare(reference, {})
    with pytest.raises(ValueError, match=r"layer 'relu1_1' has shape \(1, 2, 3, 2\)"):
        compare(reference, {"relu1_1": np.zeros((1, 2, 3, 2), np.float32)})


def test_table_flags_failures_and_nan():
    rows = [
        ParityRow("relu1_1", "features", 1e-7),
        ParityRow("relu1_1", "gram", 2e-8),
        ParityRow("relu5_1", "features", 3e-3),
        ParityRow("relu5_1", "gram", float("nan")),
    ]
    lines = format_table(rows, 1e-4).splitlines()
    assert "tolerance 1e-04" in lines[0] and "features" in lines[0] and "gram" in lines[0]
    assert lines[1].split() == ["relu1_1", "1.00e-07", "2.00e-08", "ok"]
    assert lines[2].split() == ["relu5_1", "3.00e-03", "nan", "FAIL"]
    assert not ParityRow("x", "gram", float("nan")).passed(1.0)
