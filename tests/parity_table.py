"""The parity table that `stylize-export` prints, read back by the export tests."""

from __future__ import annotations

from stylize.api.options import DEFAULT_EXPORT_LAYERS


def assert_every_layer_passes(stdout: str, tolerance: float) -> None:
    """One table per probe size (two), every tapped layer's feature and Gram errors under `tolerance`."""
    layers = set(DEFAULT_EXPORT_LAYERS)
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] and line.split()[0] in layers]
    assert len(rows) == 2 * len(DEFAULT_EXPORT_LAYERS)
    for layer, features, gram, verdict in rows:
        assert float(features) < tolerance and float(gram) < tolerance and verdict == "ok", layer
