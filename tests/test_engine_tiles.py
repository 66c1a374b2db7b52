"""Tiled optimization (server/engine/tiles.py): the grid, and the tiled gradient against the whole image's.

The engine-level tests use seeded random weights at small sizes; the gradient's exactness and the seam
test use the real ImageNet VGG19 (the receptive fields a halo must cover are the real network's).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from samples import sample_sized

from stylize.api.options import DEFAULTS, TILE_ALIGN, OptionsError, validate
from stylize.model.vgg import VGGFeatures, random_state_dict
from stylize.server.engine import tiles
from stylize.server.engine.records import Result
from stylize.server.engine.run import stylize

CPU = torch.device("cpu")


LEAST_ROWS = 128  # TileNetwork.least_rows of a network to relu5_1


def grid(height: int, width: int, tile: int, halo: int, shift=(0, 0), least_rows=LEAST_ROWS):
    return tiles.tile_grid(
        height, width, bounds=tiles.TileBounds(tile, tile), halo=halo, least_rows=least_rows, shift=shift
    )


def test_least_rows_leave_a_columns_first_tile_rows_at_every_layer(random_network) -> None:
    network = tiles.TileNetwork(random_network, random_network.context())
    assert network.least_rows == LEAST_ROWS  # 70 px of context and two positions of relu5_1, rounded up


@pytest.mark.parametrize(
    ("height", "width", "tile", "halo", "shift"), [(384, 192, 64, 32, (0, 0)), (300, 97, 96, 64, (5, 7))]
)
def test_tile_cores_cover_the_image_once_and_crops_stay_inside_on_the_grid(
    height, width, tile, halo, shift
) -> None:
    cores = grid(height, width, tile, halo, shift)
    covered = torch.zeros(height, width, dtype=torch.int32)
    for t in cores:
        covered[t.core] += 1
        (top, bottom), (left, right) = ((s.start, s.stop) for s in t.crop)
        # A crop reads the two rows above its core its first convolution needs; halo columns each side.
        assert top == max(0, t.core[0].start - 2) and bottom == t.core[0].stop
        assert 0 <= left <= t.core[1].start and t.core[1].stop <= right <= width
        assert right - t.core[1].stop in (halo, width - t.core[1].stop)
        # Every edge inside the image falls on the pooling grid, so a tile's features are the image's.
        inner = [v for v in (left, right, *(s.start for s in t.core)) if v not in (height, width)]
        assert all(v % TILE_ALIGN == 0 for v in inner)
        assert t.core[0].stop - t.core[0].start >= LEAST_ROWS
    assert torch.equal(covered, torch.ones_like(covered))


def test_the_grid_moves_every_iteration_and_is_seeded() -> None:
    first, second = (list(itertools.islice(tiles.moving_shifts(7), 6)) for _ in range(2))
    assert first == second
    for height, width, tile in ((672, 512, 192), (672, 1024, 512), (800, 320, 256)):
        grids = [grid(height, width, tile, 32, s) for s in first]
        for before, after in itertools.pairwise(grids):
            for axis in (0, 1):  # every border of both axes moves from one iteration to the next
                old, new = ({t.core[axis].start for t in cores} - {0} for cores in (before, after))
                assert old and not old & new


@pytest.mark.parametrize(
    ("length", "tile", "count"),
    [(672, 512, 2), (1024, 512, 3), (4096, 704, 6), (1000, 480, 3), (512, 512, 1)],
)
def test_each_axis_takes_the_fewest_tiles_that_leave_its_borders_room_to_move(length, tile, count) -> None:
    # 1024 = 2 x 512 leaves two tiles of 512 no room: one more tile; 672 and 4096 fit the fewest.
    for shift in range(4):
        columns = {(t.core[1].start, t.core[1].stop) for t in grid(32, length, tile, 96, (0, shift))}
        assert len(columns) == count and all(0 < stop - start <= tile for start, stop in columns)
        rows = {(t.core[0].start, t.core[0].stop) for t in grid(length, 32, tile, 96, (shift, 0))}
        assert len(rows) == count and all(LEAST_ROWS <= stop - start <= tile for start, stop in rows)


def test_rows_keep_least_rows_where_tiles_are_smaller() -> None:
    # Tiles of 64 on 384 rows: rows of 128, which have no room to move; 300 rows: two of 160 and 140.
    assert {(t.core[0].start, t.core[0].stop) for t in grid(384, 64, 64, 0, (3, 0))} == {
        (0, 128),
        (128, 256),
        (256, 384),
    }
    assert {(t.core[0].start, t.core[0].stop) for t in grid(300, 64, 64, 0, (3, 0))} == {(0, 160), (160, 300)}


def test_the_automatic_tiles_are_rows_of_the_whole_width_where_they_fit(monkeypatch) -> None:
    # Half the free memory is planned, at BYTES_PER_PIXEL a pixel: 1000 x 300 pixels here.
    monkeypatch.setattr(tiles, "free_memory", lambda device: 2 * 1000 * 300 * tiles.BYTES_PER_PIXEL)
    assert tiles.largest_bounds(1000, 96, LEAST_ROWS, CPU) == tiles.TileBounds(288, 1024)
    # 4000 columns leave 73 rows, fewer than a column's first tile needs: square cores whose crops fit.
    assert tiles.largest_bounds(4000, 96, LEAST_ROWS, CPU) == tiles.TileBounds(352, 352)


def test_a_tile_pass_computes_each_feature_once_and_only_the_context_its_core_needs(random_network) -> None:
    image = torch.rand(1, 3, 384, 320, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = random_network(image)
    passes = []

    def features(crop: torch.Tensor, maps: tiles.TileMaps) -> dict[str, torch.Tensor]:
        shapes: dict[str, tuple[int, int]] = {}

        def recording(name: str, layer_map: torch.Tensor) -> torch.Tensor:
            cut = maps(name, layer_map)
            shapes[name] = (cut.shape[-2], cut.shape[-1])
            return cut

        passes.append((maps, crop.shape[-2], shapes))
        return random_network(crop, recording)

    network = tiles.TileNetwork(features, random_network.context())
    cores = grid(384, 320, 128, 96, (1, 1))
    assert len({t.core[0].start for t in cores}) == 3  # three tiles down each column
    found = tiles.features_by_tiles(image, cores, network, random_network.layers)
    for name in random_network.layers:  # the tiles' features are the whole image's, to rounding
        torch.testing.assert_close(found[name], whole[name], rtol=1e-4, atol=1e-5)
    for maps, crop_rows, shapes in passes:
        tile = maps.tile
        assert crop_rows == tile.core[0].stop - max(0, tile.core[0].start - 2)
        # What goes down to the next tile is its own few rows, not a view keeping a whole map alive.
        assert maps.handed or tile.core[0].stop == 384
        for rows in maps.handed.values():
            assert (
                rows.shape[-2] <= 2 and rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()
            )
        for name, _, _ in network.context[1:]:
            # A map is the tile's own rows and at most the two the tile above handed down.
            own = maps.core_positions(name)[0]
            assert 0 <= shapes[name][0] - (own.stop - own.start) <= (2 if tile.core[0].start else 0)
        if tile.core[1].start >= 160 and tile.core[1].stop < 320:  # context on both sides, cut from the halo
            core = tile.core[1].stop - tile.core[1].start
            assert maps.crop[1].stop - maps.crop[1].start == core + 2 * 70
            # Cut after each pooling to the context the convolutions after it need: 34, 16, 6, 1 (even: 2).
            widths = [shapes[f"pool{n}"][1] - core // 2**n for n in (1, 2, 3, 4)]
            assert widths == [2 * 34, 2 * 16, 2 * 6, 2 * 2]
            assert shapes["relu4_1"][1] == shapes["pool3"][1]  # no cut between poolings


def test_tile_options_are_validated_with_the_fields_named() -> None:
    with pytest.raises(OptionsError) as caught:
        validate(dataclasses.replace(DEFAULTS, tile_size=100, tile_halo=1024))
    assert {v.field for v in caught.value.violations} == {"tile_size", "tile_halo"}
    validate(dataclasses.replace(DEFAULTS, tile_size=256, tile_halo=96))


@pytest.fixture(scope="module")
def random_network() -> VGGFeatures:
    return VGGFeatures().load_weights(random_state_dict(0))


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_a_tiled_job_takes_the_whole_image_step_with_either_optimizer(optimizer, random_network) -> None:
    content = sample_sized("chelsea.png", (128, 96))
    style = sample_sized("hubble_deep_field.jpg", (96, 96))
    options = dataclasses.replace(
        DEFAULTS,
        size=128,
        min_size=128,
        initial_iterations=2,
        optimizer=optimizer,
        precision="fp32",
        style_layers=(("relu1_1", 1.0), ("relu2_1", 1.0), ("relu3_1", 1.0)),
        content_layers=(("relu3_1", 1.0),),
    )

    def output(**changes: object) -> torch.Tensor:
        records = list(
            stylize(
                content, [(style, 1.0)], dataclasses.replace(options, **changes), random_network, device=CPU
            )
        )
        assert isinstance(records[-1], Result)
        return records[-1].image

    whole = output()
    tiled = output(tile_size=64, tile_halo=32)  # relu3_1 sees 13 px each way: 32 covers it
    moved = (tiled - content).norm()
    assert moved > 0.01  # the job did move the image
    assert (tiled - whole).norm() / (whole - content).norm() < 1e-2
    assert not torch.equal(output(tile_size=64, tile_halo=0), whole)  # tiling is really in use


def test_a_scale_that_does_not_fit_in_memory_runs_tiled(random_network, monkeypatch) -> None:
    calls = []
    real = tiles.tiled_terms
    # A 64x48 scale needs about 10 MB whole, 91x68 about 21 MB: with 30 MB free, half of it planned, the
    # first scale runs whole and the two larger ones in tiles.
    monkeypatch.setattr(tiles, "free_memory", lambda device: 30_000_000)
    monkeypatch.setattr(tiles, "tiled_terms", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    content = sample_sized("chelsea.png", (128, 96))
    options = dataclasses.replace(
        DEFAULTS, size=128, min_size=64, initial_iterations=1, iterations=1, precision="fp32"
    )
    records = list(stylize(content, [(content, 1.0)], options, random_network, device=CPU))
    assert isinstance(records[-1], Result)
    # One iteration at each tiled scale and the final evaluation, each over several tiles.
    assert len(calls) == 3 and all(count > 1 for count in calls)


def test_tile_size_takes_rows_of_the_whole_width_where_they_fit_in_its_square(random_network, monkeypatch):
    columns = []
    real = tiles.tiled_terms
    monkeypatch.setattr(
        tiles,
        "tiled_terms",
        lambda *a, **k: columns.append({(t.core[1].start, t.core[1].stop) for t in a[2]}) or real(*a, **k),
    )
    content = sample_sized("chelsea.png", (512, 384))
    for tile_size in (448, 256):
        options = dataclasses.replace(
            DEFAULTS,
            size=512,
            min_size=512,
            initial_iterations=1,
            iterations=1,
            precision="fp32",
            tile_size=tile_size,
        )
        columns.clear()
        records = list(stylize(content, [(content, 1.0)], options, random_network, device=CPU))
        assert isinstance(records[-1], Result) and columns
        if tile_size == 448:  # 448 x 448 pixels hold 390 rows of 512: rows of 384 (no room: two of 192)
            assert all(found == {(0, 512)} for found in columns)
        else:  # 126 rows of 512, fewer than the 128 a column's first tile needs: cores of at most 256
            assert all(
                len(found) > 1 and all(stop - start <= 256 for start, stop in found) for found in columns
            )


@pytest.fixture(scope="module")
def real_network(real_weights_cache):
    from bench.tiles import LAYERS
    from stylize.model.weights import resolve_weights

    weights = resolve_weights("imagenet-q8", cache=real_weights_cache)
    return VGGFeatures(layers=LAYERS, normalization=weights.normalization).load_weights(weights.state_dict)


# Each term alone, at more sizes and halos: python -m bench.tiles exactness (docs/tiles.md).
@pytest.mark.parametrize("term", ["mean_covariance", "all (gram)"])
def test_the_tiled_gradient_equals_the_whole_images_at_the_default_halo(term, real_network) -> None:
    from bench.tiles import TERMS, images, objective, relative, tiled_gradient, whole_gradient

    # Portrait (160 x 256 turned on its side): two rows of tiles and two columns of 128.
    content, style, image = (i.transpose(-1, -2) for i in images(256))
    assert {len({t.core[axis].start for t in grid(256, 160, 128, 0)}) for axis in (0, 1)} == {2}
    made = objective(
        real_network, content, style, "mean_covariance" if term == "mean_covariance" else "gram", TERMS[term]
    )
    whole_terms, whole = whole_gradient(made, real_network, image)
    tiled_terms, tiled = tiled_gradient(made, real_network, image, 128, DEFAULTS.tile_halo, (1, 2))
    assert relative(tiled, whole) < 1e-3
    assert relative(tiled_terms, whole_terms) < 1e-5
    if term == "all (gram)":  # without a halo the tiles' edges see zeros: the check is not vacuous
        _, cut = tiled_gradient(made, real_network, image, 128, 0, (1, 2))
        assert relative(cut, whole) > 1e-2


def test_the_gradient_has_no_seam_at_tile_borders(real_network) -> None:
    from bench.tiles import TERMS, images, objective, tiled_gradient, whole_gradient

    content, style, image = images(256)
    made = objective(real_network, content, style, "gram", TERMS["all (gram)"])
    _, whole = whole_gradient(made, real_network, image)
    shift = (1, 2)
    _, tiled = tiled_gradient(made, real_network, image, 64, DEFAULTS.tile_halo, shift)
    near = torch.zeros(image.shape[-2:], dtype=torch.bool)
    for t in grid(*image.shape[-2:], 64, DEFAULTS.tile_halo, shift):
        for axis, core in enumerate(t.core):
            for edge in (core.start, core.stop):
                band = slice(max(0, edge - 4), edge + 4)
                if axis == 0:
                    near[band, :] = True
                else:
                    near[:, band] = True
    assert 0.1 < near.float().mean() < 0.9
    error = (tiled - whole).norm(dim=1)[0]
    for region in (near, ~near):
        # Relative to the gradient's own size there: a seam would show as a larger error at the borders.
        assert error[region].norm() / whole.norm(dim=1)[0][region].norm() < 1e-3
