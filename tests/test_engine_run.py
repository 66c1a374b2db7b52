"""The stylize loop end to end on the CPU with seeded random VGG weights, at 32-64 pixels."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from samples import sample

from stylize.api.options import DEFAULTS, Limits, OptionsError, StyleOptions, validate
from stylize.model.vgg import VGGFeatures, random_state_dict
from stylize.server.engine import color
from stylize.server.engine.imageio import pil_to_tensor, tensor_to_pil
from stylize.server.engine.losses import TVLoss
from stylize.server.engine.optimizers import LBFGSStepper
from stylize.server.engine.records import Cancelled, NonFiniteLoss, Progress, Result, Started
from stylize.server.engine.run import stylize

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Other test modules run torch at the same time on this small machine; one intra-op thread
    avoids the oversubscription that makes threaded LAPACK calls (eigh) 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def extractor() -> VGGFeatures:
    return VGGFeatures().load_weights(random_state_dict(0))


@pytest.fixture(scope="module")
def content() -> torch.Tensor:
    return sample("chelsea.png", 96)


@pytest.fixture(scope="module")
def style() -> torch.Tensor:
    return sample("hubble_deep_field.jpg", 96)


def small(**changes: object) -> StyleOptions:
    """Default options at a small single scale with few iterations, plus `changes`."""
    base = {"size": 32, "min_size": 32, "initial_iterations": 3, "iterations": 2}
    return dataclasses.replace(DEFAULTS, **(base | changes))


def run(content, styles, options, extractor, **kwargs) -> tuple[list[Progress], Result]:
    records = list(stylize(content, styles, options, extractor, device=CPU, **kwargs))
    started, *progress, result = records
    assert isinstance(started, Started) and started.precision in ("fp32", "bf16")
    assert isinstance(result, Result) and all(isinstance(p, Progress) for p in progress)
    assert started.iterations_total == result.iterations
    return progress, result


@pytest.fixture(scope="module")
def at_defaults(content, style, extractor) -> Result:
    return run(content, [(style, 1.0)], small(), extractor)[1]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"optimizer": "adam"},
        {"optimizer": "adam", "ema_decay": 0.0},
        {"style_loss": "mean_covariance"},
        {"init": "noise"},
        {"init": "gray"},
        {"init": "style_stats"},
        {"color": "luminance"},
        {"color": "histogram"},
        {"pooling": "average"},
        {"padding": "replicate"},
        {"precision": "fp32"},
        {"precision": "bf16"},
        {"style_scale": 0.5},
        {"style_scale": 2.0},
        {"content_weight": 0.0},
        {"tv_weight": 0.0, "content_layers": (("relu3_1", 1.0), ("conv4_2", 0.5))},
        {"style_layers": (("relu1_1", 1.0), ("relu2_1", 0.0))},  # network stops at relu4_2
        {"size": 48, "min_size": 32, "scale_factor": 1.5},
    ],
    ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()) or "defaults",
)
def test_every_feature_runs(changes, content, style, extractor, at_defaults) -> None:
    options = small(**changes)
    progress, result = run(content, [(style, 1.0)], options, extractor)
    if changes and "precision" not in changes:
        # Each feature changes the output: one that is silently ignored fails here. (The precisions are
        # compared with each other below: AUTO is one of them, whichever this CPU resolves it to.)
        assert result.image.shape != at_defaults.image.shape or not torch.allclose(
            result.image, at_defaults.image, atol=1e-4
        ), f"{changes} made no difference"
    assert len(progress) == result.iterations == progress[-1].iterations_total
    assert [p.iteration for p in progress] == list(range(1, result.iterations + 1))
    longest = max(result.image.shape[1:])
    assert result.image.shape[0] == 3 and longest == options.size
    assert result.image.min() >= 0 and result.image.max() <= 1
    assert math.isfinite(result.losses.total) and math.isfinite(progress[0].losses.total)
    assert result.losses.total == pytest.approx(
        result.losses.content + result.losses.style + result.losses.total_variation, rel=1e-5
    )


def test_fp32_and_bf16_give_different_outputs(content, style, extractor) -> None:
    _, fp32 = run(content, [(style, 1.0)], small(precision="fp32"), extractor)
    _, bf16 = run(content, [(style, 1.0)], small(precision="bf16"), extractor)
    assert not torch.equal(fp32.image, bf16.image)
    assert (fp32.image - bf16.image).abs().mean() < 0.05  # the same job, rounded differently


def test_several_styles_blend_by_weight(content, style, extractor) -> None:
    other = sample("ihc.png", 64)
    options = small(initial_iterations=1)
    _, only_first = run(content, [(style, 1.0), (other, 0.0)], options, extractor)
    _, alone = run(content, [(style, 1.0)], options, extractor)
    _, mixed = run(content, [(style, 1.0), (other, 3.0)], options, extractor)
    _, scaled = run(content, [(style, 0.5), (other, 1.5)], options, extractor)
    assert torch.equal(only_first.image, alone.image)  # weight 0 contributes nothing
    assert not torch.equal(mixed.image, alone.image)
    assert torch.allclose(scaled.image, mixed.image, atol=1e-5)  # only the weights' ratio counts


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_style_loss_falls_by_90_percent_within_200_iterations_at_defaults(
    optimizer, content, style, extractor
) -> None:
    # Only the schedule changes (one 64 px scale of 200 iterations); optimizer and loss settings are defaults.
    options = dataclasses.replace(DEFAULTS, optimizer=optimizer, size=64, min_size=64, initial_iterations=200)
    progress, result = run(content, [(style, 1.0)], options, extractor)
    start = progress[0].losses
    assert result.iterations == 200
    # From the content image the content term starts at zero and can only rise to take its share of the
    # optimum, so the style term is the one that must fall by 90%; the total falls by most of that.
    assert result.losses.style <= 0.1 * start.style, (start, result.losses)
    assert result.losses.total <= 0.2 * start.total, (start, result.losses)


def test_luminance_transfer_keeps_the_content_chroma(content, style, extractor) -> None:
    _, result = run(content, [(style, 1.0)], small(color="luminance", initial_iterations=10), extractor)
    height, width = result.image.shape[1:]
    expected = F.interpolate(content[None], size=(height, width), mode="bicubic", antialias=True).clamp(0, 1)[
        0
    ]
    chroma_out = color.rgb_to_ycbcr(result.image)[1:]
    chroma_content = color.rgb_to_ycbcr(expected)[1:]
    assert (chroma_out - chroma_content).abs().mean() < 0.01
    # ... while the luminance did change: the style was transferred.
    assert (color.luminance(result.image) - color.luminance(expected)).abs().mean() > 0.01
    _, plain = run(content, [(style, 1.0)], small(initial_iterations=10), extractor)
    assert (color.rgb_to_ycbcr(plain.image)[1:] - chroma_content).abs().mean() > 0.01


@pytest.mark.parametrize("changes", [{"init": "noise", "optimizer": "adam"}, {"init": "style_stats"}])
def test_same_seed_gives_the_same_output(changes, content, style, extractor) -> None:
    torch.manual_seed(123)  # the global RNG plays no part
    _, first = run(content, [(style, 1.0)], small(seed=7, **changes), extractor)
    torch.manual_seed(456)
    _, second = run(content, [(style, 1.0)], small(seed=7, **changes), extractor)
    _, other_seed = run(content, [(style, 1.0)], small(seed=8, **changes), extractor)
    assert torch.equal(first.image, second.image)
    assert not torch.equal(first.image, other_seed.image)


def test_cancellation_stops_within_one_iteration(content, style, extractor) -> None:
    cancel = threading.Event()
    jobs: Iterator = stylize(
        content, [(style, 1.0)], small(initial_iterations=50), extractor, device=CPU, cancel=cancel
    )
    assert isinstance(next(jobs), Started)
    seen = []
    with pytest.raises(Cancelled):
        for record in jobs:
            seen.append(record)
            if record.iteration == 3:
                cancel.set()
    assert [r.iteration for r in seen] == [1, 2, 3]


def test_previews_come_when_due_and_progress_reports_time(content, style, extractor) -> None:
    options = small(size=48, min_size=32, scale_factor=1.5, initial_iterations=4, iterations=3)
    progress, result = run(content, [(style, 1.0)], options, extractor, preview_every=3)
    with_image = [p.iteration for p in progress if p.image is not None]
    assert with_image == [3, 6]
    assert [(p.scale, p.width, p.height) for p in progress] == [(0, 32, 21)] * 4 + [(1, 48, 32)] * 3
    preview = progress[5].image
    assert preview.shape == (3, 32, 48) and preview.device.type == "cpu"
    assert progress[-1].eta_seconds == 0
    shrunk, _ = run(content, [(style, 1.0)], options, extractor, preview_every=3, preview_max_size=24)
    assert shrunk[5].image.shape == (3, 16, 24)  # shrunk in the engine, before it leaves the device
    elapsed = [p.elapsed_seconds for p in progress]
    assert elapsed == sorted(elapsed) and result.elapsed_seconds >= elapsed[-1]


def test_progress_every_thins_the_records_but_keeps_scale_ends(content, style, extractor) -> None:
    options = small(size=48, min_size=32, scale_factor=1.5, initial_iterations=5, iterations=5)
    progress, _ = run(content, [(style, 1.0)], options, extractor, progress_every=4)
    assert [p.iteration for p in progress] == [4, 5, 8, 10]


def test_targets_function_replaces_the_extractor_for_targets(content, style, extractor) -> None:
    calls = []

    def targets(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(tuple(batch.shape))
        with torch.no_grad():
            return extractor(batch)

    options = small(precision="fp32", initial_iterations=2)
    _, with_fn = run(content, [(style, 1.0)], options, extractor, targets=targets)
    _, without = run(content, [(style, 1.0)], options, extractor)
    assert len(calls) == 2  # content and style, once each at the one scale
    assert torch.allclose(with_fn.image, without.image, atol=1e-3)


def test_bad_input_is_rejected_before_any_work(content, style) -> None:
    not_an_extractor = object()  # any use of it would raise AttributeError
    with pytest.raises(OptionsError) as caught:
        stylize(content, [(style, 1.0)], small(size=4096), not_an_extractor, device=CPU)
    assert [v.field for v in caught.value.violations] == ["size"]
    with pytest.raises(OptionsError) as caught:
        stylize(content, [], small(), not_an_extractor, device=CPU, limits=Limits(max_styles=2))
    assert [v.field for v in caught.value.violations] == ["styles"]
    with pytest.raises(OptionsError) as caught:
        stylize(content[:1], [(style, -1.0)], small(), not_an_extractor, device=CPU)
    assert {v.field for v in caught.value.violations} == {"content", "styles[0].weight"}


def test_image_conversion_round_trip_and_alpha_on_white() -> None:
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    pil = tensor_to_pil(image)
    assert pil.size == (7, 5) and pil.mode == "RGB"
    assert (pil_to_tensor(pil) - image).abs().max() <= 0.5 / 255 + 1e-6
    transparent = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert torch.equal(pil_to_tensor(transparent), torch.ones(3, 2, 2))


def _gradient_quarters(image: Image.Image) -> list[float]:
    """The decoded grey of a left-to-right 0..1 gradient, averaged over each quarter of its width."""
    grey = pil_to_tensor(image)
    assert grey.shape[0] == 3 and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    width = grey.shape[-1]
    return [float(grey[0, :, q * width // 4 : (q + 1) * width // 4].mean()) for q in range(4)]


@pytest.mark.parametrize("mode", ["L", "I;16", "I;16B", "I", "F"])
def test_grey_modes_decode_to_their_values(mode: str, tmp_path) -> None:
    """Issue 16: a 16-bit grey PNG's quarters decoded as 0.70 / 0.76 (PIL clips to 8 bits) instead of
    0.12 / 0.88. Each mode, built from the same 0..1 gradient, must decode to the gradient."""
    ramp = np.tile(np.linspace(0, 1, 64), (8, 1))
    white = {"L": 255, "I;16": 65535, "I;16B": 65535, "I": 65535, "F": 255}[mode]
    dtype = {"L": np.uint8, "I;16": "<u2", "I;16B": ">u2", "I": np.int32, "F": np.float32}[mode]
    image = Image.frombytes(mode, (64, 8), np.round(ramp * white).astype(dtype).tobytes())
    if mode in ("L", "I;16"):  # through a real PNG file too, as a caller sends it
        image.save(tmp_path / "grey.png")
        image = Image.open(tmp_path / "grey.png")
    expected = [float(ramp[:, q * 16 : (q + 1) * 16].mean()) for q in range(4)]
    assert _gradient_quarters(image) == pytest.approx(expected, abs=0.02)


def _one_pixel(mode: str, value: object, **info: object) -> Image.Image:
    image = Image.new(mode, (1, 1), value)  # type: ignore[arg-type]
    image.info.update(info)
    return image


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([200, 40, 10, 0, 0, 255])
    image.putdata([0, 1])
    if transparent:
        image.info["transparency"] = 1  # the second colour is see-through: white behind it
    return image


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.frombytes("1", (8, 1), bytes([0b10100000])), [[1, 0, 1, 0, 0, 0, 0, 0]] * 3),
        (_one_pixel("LA", (100, 255)), [[100 / 255]] * 3),
        (_one_pixel("LA", (0, 0)), [[1.0]] * 3),  # fully transparent: the white background
        (_one_pixel("RGB", (255, 128, 0)), [[1.0], [128 / 255], [0.0]]),
        (_one_pixel("RGBA", (0, 0, 0, 128)), [[127 / 255]] * 3),  # half black over white
        (_one_pixel("CMYK", (255, 0, 0, 0)), [[0.0], [1.0], [1.0]]),  # cyan
        (_one_pixel("CMYK", (0, 0, 0, 255)), [[0.0]] * 3),  # black
        (_palette(False), [[200 / 255, 0.0], [40 / 255, 0.0], [10 / 255, 1.0]]),
        (_palette(True), [[200 / 255, 1.0], [40 / 255, 1.0], [10 / 255, 1.0]]),
    ],
    ids=["1", "LA", "LA-transparent", "RGB", "RGBA", "CMYK-cyan", "CMYK-black", "P", "P+tRNS"],
)
def test_every_colour_mode_decodes_to_its_reference_rgb(image: Image.Image, expected) -> None:
    """Issue 16: each PIL mode the server accepts, against its RGB reference (transparency over white)."""
    decoded = pil_to_tensor(image)
    assert decoded.shape == (3, 1, len(expected[0]))
    assert torch.allclose(decoded[:, 0, :], torch.tensor(expected, dtype=torch.float32), atol=1 / 255)


def test_lbfgs_accepts_a_non_contiguous_content_image() -> None:
    # pil_to_tensor returns a permuted (non-contiguous) view; torch's LBFGS flattens the
    # gradient with view(-1), which fails unless the optimized image is contiguous.
    content = torch.rand(32, 32, 3).permute(2, 0, 1)
    assert not content.is_contiguous()
    stepper = LBFGSStepper(content, history=5)

    def closure() -> torch.Tensor:
        loss = (stepper.image - 0.5).square().sum()
        loss.backward()  # LBFGS flattens this gradient: the path the test is about
        return loss[None]

    before = stepper.output()
    stepper.step(closure)
    assert stepper.output().is_contiguous() and not torch.equal(stepper.output(), before)


def test_a_loss_that_stops_being_finite_fails_the_job_naming_the_term(content, style, extractor) -> None:
    """The guard, fed targets that make the content term NaN: never a NaN image reported as a success."""

    def nan_content(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            features = extractor.configured(layers=["relu4_2"])(batch)
        return {"relu4_2": torch.full_like(features["relu4_2"], math.nan)}

    with pytest.raises(NonFiniteLoss) as caught:
        run(content, [(style, 1.0)], small(), extractor, targets=nan_content)
    assert caught.value.term == "content" and caught.value.iteration == 1
    assert "content_weight" in str(caught.value) and "not finite at iteration 1" in str(caught.value)


def test_total_variation_of_a_one_pixel_edge_is_finite() -> None:
    row = torch.rand(1, 3, 1, 64, generator=torch.Generator().manual_seed(0))
    tv = TVLoss()(row)
    expected = (row[..., 1:] - row[..., :-1]).square().mean()
    assert torch.isfinite(tv) and torch.allclose(tv, expected)
    assert float(TVLoss()(torch.rand(1, 3, 1, 1))) == 0.0


@pytest.mark.parametrize("changes", [{"init": "style_stats"}, {"color": "luminance"}])
def test_a_one_pixel_style_gives_finite_statistics(changes, content, extractor) -> None:
    """Issue 16: init=STYLE_STATS or color=LUMINANCE with a 1x1 style ended OK with NaN losses (an unbiased
    standard deviation of one value); now the job runs to finite losses (the guard would fail it)."""
    dot = torch.rand(3, 1, 1, generator=torch.Generator().manual_seed(1))
    _, result = run(content, [(dot, 1.0)], small(**changes), extractor)
    assert math.isfinite(result.losses.total) and torch.isfinite(result.image).all()


def test_checked_options_run_unchecked_and_only_for_the_input_they_were_checked_for(
    content, style, extractor
) -> None:
    size = (content.shape[-1], content.shape[-2])
    checked = validate(small(), content_size=size, styles=1, style_weights=[1.0])
    records = list(stylize(content, [(style, 1.0)], checked, extractor, device=torch.device("cpu")))
    assert isinstance(records[-1], Result)
    with pytest.raises(ValueError, match="checked for"):
        stylize(content, [(style, 1.0), (style, 1.0)], checked, extractor, device=torch.device("cpu"))
