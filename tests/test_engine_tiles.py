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


@pytest.mark.parametrize(
    ("height", "width", "tile", "halo", "shift"), [(256, 192, 64, 32, (0, 0)), (200, 97, 96, 64, (5, 7))]
)
def test_tile_cores_cover_the_image_once_and_crops_stay_inside_on_the_grid(
    height, width, tile, halo, shift
) -> None:
    grid = tiles.tile_grid(height, width, tile=tile, halo=halo, shift=shift)
    covered = torch.zeros(height, width, dtype=torch.int32)
    for t in grid:
        covered[t.core] += 1
        (top, bottom), (left, right) = ((s.start, s.stop) for s in t.crop)
        assert 0 <= top <= t.core[0].start and t.core[0].stop <= bottom <= height
        assert 0 <= left <= t.core[1].start and t.core[1].stop <= right <= width
        # Every edge inside the image falls on the pooling grid, so a tile's features are the image's.
        inner = [
            v
            for v in (top, bottom, left, right, t.core[0].start, t.core[1].start)
            if v not in (height, width)
        ]
        assert all(v % TILE_ALIGN == 0 for v in inner)
        assert bottom - t.core[0].stop in (halo, height - t.core[0].stop)
    assert torch.equal(covered, torch.ones_like(covered))


def test_the_grid_moves_every_iteration_and_is_seeded() -> None:
    first, second = (list(itertools.islice(tiles.moving_shifts(7), 6)) for _ in range(2))
    assert first == second
    for height, width, tile in ((512, 512, 128), (672, 1024, 512), (256, 256, 64)):
        grids = [tiles.tile_grid(height, width, tile=tile, halo=32, shift=s) for s in first]
        for before, after in itertools.pairwise(grids):
            for axis in (0, 1):  # every border of both axes moves from one iteration to the next
                old, new = ({t.core[axis].start for t in grid} - {0} for grid in (before, after))
                assert old and not old & new


@pytest.mark.parametrize(
    ("length", "tile", "count"),
    [(672, 512, 2), (1024, 512, 3), (4096, 704, 6), (1000, 480, 3), (512, 512, 1)],
)
def test_each_axis_takes_the_fewest_tiles_that_leave_its_borders_room_to_move(length, tile, count) -> None:
    # 1024 = 2 x 512 leaves two tiles of 512 no room: one more tile; 672 and 4096 fit the fewest.
    for shift in range(4):
        cores = {
            (t.core[1].start, t.core[1].stop)
            for t in tiles.tile_grid(32, length, tile=tile, halo=96, shift=(0, shift))
        }
        assert len(cores) == count and all(0 < stop - start <= tile for start, stop in cores)


def test_a_tile_pass_computes_only_the_context_its_core_needs(random_network) -> None:
    image = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(3))
    network = tiles.TileNetwork(random_network, random_network.context())
    with torch.no_grad():
        whole = random_network(image)
    widths = {}

    def recording(name: str, layer_map: torch.Tensor) -> torch.Tensor:
        cut = maps(name, layer_map)
        widths[name] = cut.shape[-1]
        return cut

    for tile in tiles.tile_grid(256, 320, tile=128, halo=96, shift=(1, 1)):
        maps = tiles.TileMaps(tile, network.context)
        with torch.no_grad():
            features = random_network(maps.input(image), recording)
        for name, d, _ in network.context[1:]:
            if name in features:  # the core's features are the whole image's, to rounding
                expected = whole[name][..., tile.image_features(d)[0], tile.image_features(d)[1]]
                torch.testing.assert_close(maps.core_of(name, features[name]), expected, rtol=1e-4, atol=1e-5)
        if tile.core[1].start >= 160 and tile.core[1].stop < 320:  # context on both sides, cut from the halo
            core = tile.core[1].stop - tile.core[1].start
            assert maps.crop[1].stop - maps.crop[1].start == core + 2 * 70
            # Cut after each pooling to the context the convolutions after it need: 34, 16, 6, 1 (even: 2).
            assert [widths[f"pool{n}"] - core // 2**n for n in (1, 2, 3, 4)] == [2 * 34, 2 * 16, 2 * 6, 2 * 2]
            assert widths["relu4_1"] == widths["pool3"]  # no cut between poolings


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

    content, style, image = images(256)
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
    for t in tiles.tile_grid(*image.shape[-2:], tile=64, halo=DEFAULTS.tile_halo, shift=shift):
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
