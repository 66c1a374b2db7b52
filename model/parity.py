"""Compare two backends' features layer by layer: the activations and their Gram matrices.

Relative error is max|candidate - reference| / max|reference|: scale-free, so one
tolerance fits relu1_1 and relu5_1 alike, and dominated by the worst element, which is
what a silently wrong kernel produces. Grams are compared too because style losses see
the features only through them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

Quantity = Literal["features", "gram"]
DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityRow:
    layer: str
    quantity: Quantity
    relative_error: float

    def passed(self, tolerance: float) -> bool:
        return bool(self.relative_error <= tolerance)  # False for NaN too


def gram(features: np.ndarray) -> np.ndarray:
    """N x C x H x W -> N x C x C, divided by H*W; float64, so the comparison adds no error of its own."""
    n, c, h, w = features.shape
    flat = features.astype(np.float64).reshape(n, c, h * w)
    return flat @ flat.transpose(0, 2, 1) / (h * w)


def relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    difference = float(np.max(np.abs(candidate.astype(np.float64) - reference))) if reference.size else 0.0
    if scale == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / scale


def compare(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> list[ParityRow]:
    """A features row and a Gram row per reference layer; ValueError for a missing or misshapen layer."""
    rows: list[ParityRow] = []
    for layer, ref in reference.items():
        if layer not in candidate:
            raise ValueError(f"candidate lacks layer {layer!r}")
        cand = np.asarray(candidate[layer])
        if cand.shape != ref.shape:
            raise ValueError(f"layer {layer!r} has shape {cand.shape}, reference {ref.shape}")
        rows.append(ParityRow(layer, "features", relative_error(ref, cand)))
        rows.append(ParityRow(layer, "gram", relative_error(gram(ref), gram(cand))))
    return rows


def worst(rows: Iterable[ParityRow]) -> float:
    """The largest relative error (NaN if any is NaN), 0.0 for no rows."""
    errors = [row.relative_error for row in rows]
    return float(np.max(errors)) if errors else 0.0


def format_table(rows: Iterable[ParityRow], tolerance: float = DEFAULT_TOLERANCE) -> str:
    """A fixed-width table, one line per layer, a column per quantity and a verdict against `tolerance`."""
    by_layer: dict[str, dict[str, ParityRow]] = {}
    for row in rows:
        by_layer.setdefault(row.layer, {})[row.quantity] = row
    quantities = list(dict.fromkeys(q for cells in by_layer.values() for q in cells))
    width = max([len("layer"), *map(len, by_layer)])
    header = (
        f"{'layer':<{width}}  " + "  ".join(f"{q:>10}" for q in quantities) + f"  (tolerance {tolerance:.0e})"
    )
    lines = [header]
    for layer, cells in by_layer.items():
        values = "  ".join(
            f"{cells[q].relative_error:>10.2e}" if q in cells else f"{'-':>10}" for q in quantities
        )
        verdict = "ok" if all(cell.passed(tolerance) for cell in cells.values()) else "FAIL"
        lines.append(f"{layer:<{width}}  {values}  {verdict}")
    return "\n".join(lines)
