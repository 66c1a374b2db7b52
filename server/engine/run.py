"""The optimization loop: `stylize` turns a content image and styles into progress records and a result.

It knows nothing of gRPC. Per scale of the coarse-to-fine schedule it resizes the
content and the styles, computes the targets once (forward only: the caller's TargetFn,
such as an ONNX Runtime session, or the torch extractor under no_grad), builds the loss
modules with those targets as buffers, and runs the optimizer one iteration at a time.

Host-device syncs: an iteration queues its work without waiting for the device; reading
the loss values for a Progress record is one copy of four floats (a sync). Callers that
need no per-iteration records on a GPU pass `progress_every` > 1 and the loop runs
unsynchronized between records (Adam; L-BFGS syncs inside torch's implementation).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from stylize.api import schedule
from stylize.api.options import (
    DEFAULT_LIMITS,
    LAYERS,
    Backbone,
    CheckedOptions,
    ColorMode,
    FieldViolation,
    Limits,
    Optimizer,
    OptionsError,
    Precision,
    StyleOptions,
    StyleResize,
    downsampling,
    validate,
)
from stylize.server.engine import color, precision, tiles
from stylize.server.engine.init import initial_image
from stylize.server.engine.losses import STYLE_LOSSES, ContentLoss, LayerSum, Objective, blend
from stylize.server.engine.optimizers import AdamStepper, LBFGSStepper, Stepper
from stylize.server.engine.records import Cancelled, Progress, Result, Started, finite_losses

# Forward-only features of the configured layers for a [1, 3, H, W] RGB batch in [0, 1]
# (on the engine's device); the returned tensors may live on any device.
TargetFn = Callable[[Tensor], dict[str, Tensor]]
# Anything with the torch extractor's interface (stylize.model.vgg.VGGFeatures).
if TYPE_CHECKING:
    from stylize.model.vgg import Trim
    from stylize.model.vgg import VGGFeatures as Extractor
else:
    Extractor = torch.nn.Module


def active_layers(options: StyleOptions) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(content layers, style layers) that contribute to the loss, i.e. with a positive weight
    inside a term of positive weight. Only these are computed: a deep layer that weighs nothing
    would cost the most expensive convolutions of every iteration for nothing."""
    content = tuple(name for name, w in options.content_layers if w > 0) if options.content_weight > 0 else ()
    style = tuple(name for name, w in options.style_layers if w > 0) if options.style_weight > 0 else ()
    return content, style


def stylize(
    content: Tensor,
    styles: Sequence[tuple[Tensor, float]],
    options: StyleOptions | CheckedOptions,
    extractor: Extractor,
    *,
    device: torch.device,
    targets: TargetFn | None = None,
    preview_every: int = 0,
    preview_max_size: int = 0,
    cancel: threading.Event | None = None,
    limits: Limits = DEFAULT_LIMITS,
    progress_every: int = 1,
) -> Iterator[Started | Progress | Result]:
    """Validate at once (OptionsError naming the fields), then return the generator of the job. Options
    that validate() already returned (CheckedOptions, for this content's size and number of styles) are
    not checked again.

    content: [3, H, W] RGB float in [0, 1]; styles: (image [3, h, w], blend weight) pairs.
    The generator yields a Started record (the plan and the precision), then a Progress per
    iteration (every `progress_every`-th, and always the last of each scale and any iteration
    with a preview due), its `image` set when `preview_every` divides the 1-based iteration (with
    its longest edge at most `preview_max_size`, shrunk on the device; 0: full size),
    then one Result. It raises Cancelled within one iteration of `cancel` being set. `targets`,
    when given, must compute the same features as `extractor` configured with the job's pooling
    and padding; layers it does not return come from the torch extractor. The extractor's
    parameters are moved to `device` and its convolution weights made channels-last, in place; its
    `arch` must be the options' backbone. Layers may be given by their Keras aliases.
    """
    violations = _image_violations(content, styles)
    backbone = options.options.backbone if isinstance(options, CheckedOptions) else options.backbone
    arch = getattr(extractor, "arch", Backbone.VGG19)
    if arch != backbone:
        violations.append(FieldViolation("backbone", f"is {backbone}, but this engine's network is {arch}"))
    content_size = None if violations else (content.shape[-1], content.shape[-2])
    if isinstance(options, CheckedOptions):
        if not violations and (options.content_size, options.styles) != (content_size, len(styles)):
            raise ValueError(
                f"options were checked for {options.content_size} and {options.styles} style(s), "
                f"not for {content_size} and {len(styles)}"
            )
        checked = options
    else:
        try:
            checked = validate(
                options,
                limits,
                content_size=content_size,
                styles=len(styles),
                style_weights=[weight for _, weight in styles],
            )
        except OptionsError as error:
            violations += error.violations
    if violations:
        raise OptionsError(violations)
    if preview_every < 0 or progress_every < 1:
        raise ValueError(
            f"preview_every must be >= 0 and progress_every >= 1, got {preview_every}, {progress_every}"
        )
    return _Job(content, styles, checked.options, extractor, device, targets, cancel).run(
        preview_every, progress_every, preview_max_size
    )


def _image_violations(content: Tensor, styles: Sequence[tuple[Tensor, float]]) -> list[FieldViolation]:
    images = [("content", content), *((f"styles[{i}].image", style) for i, (style, _) in enumerate(styles))]
    return [
        FieldViolation(name, f"expected a float RGB tensor [3, H, W], got {tuple(image.shape)}")
        for name, image in images
        if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point() or image.numel() == 0
    ]


def _resize(image: Tensor, height: int, width: int) -> Tensor:
    """[N, C, H, W] -> [N, C, height, width], bicubic, antialiased when shrinking, clipped to [0, 1]."""
    if image.shape[-2:] == (height, width):
        return image
    return F.interpolate(image, size=(height, width), mode="bicubic", antialias=True).clamp(0, 1)


# The layout of the network's input (_network_input) and of its convolution weights. A convolution whose
# input and weight differ in layout converts the weight, in the forward and in the backward pass of
# every iteration.
NETWORK_MEMORY_FORMAT = torch.channels_last


def _network_input(image: Tensor) -> Tensor:
    """The optimized image as the network's input: luminance repeated to RGB; channels-last, the
    layout oneDNN's and cuDNN's fastest convolutions (bf16 especially) want."""
    if image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    return image.contiguous(memory_format=NETWORK_MEMORY_FORMAT)


def to_network_layout(network: torch.nn.Module) -> None:
    """Convert the 4-D parameters (the convolution weights) of `network` to NETWORK_MEMORY_FORMAT, in
    place; those already in it are left as they are."""
    for parameter in network.parameters():
        if parameter.dim() == 4 and not parameter.is_contiguous(memory_format=NETWORK_MEMORY_FORMAT):
            parameter.data = parameter.data.contiguous(memory_format=NETWORK_MEMORY_FORMAT)


class _Job:
    def __init__(
        self,
        content: Tensor,
        styles: Sequence[tuple[Tensor, float]],
        options: StyleOptions,
        extractor: Extractor,
        device: torch.device,
        targets: TargetFn | None,
        cancel: threading.Event | None,
    ):
        self.options = o = options
        self.device = device
        self.cancel = cancel
        self.targets = targets
        self.content_layers, self.style_layers = active_layers(o)
        layers = set(self.content_layers) | set(self.style_layers)
        self.layers = tuple(name for name in LAYERS[Backbone(o.backbone)] if name in layers)
        # Like the move to `device`, the weights' layout is converted in place, once per extractor (a
        # no-op when it is already the one wanted, as for the server's, converted at start-up).
        extractor = extractor.to(device)
        to_network_layout(extractor)
        # Targets come from the float32 network; the loop's network holds its weights in the
        # precision it computes in, so autocast does not re-cast 20M parameters every iteration
        # (it caches casts only for parameters that require grad, and these do not).
        self.target_network = (
            extractor.configured(layers=self.layers, pooling=o.pooling, padding=o.padding)
            if self.layers
            else None
        )
        self.precision = precision.resolve(Precision(o.precision), device, extractor)
        self.network = self.target_network
        if self.network is not None:
            # A cast made before the extractor was converted is converted too (in place, once).
            self.network = self.network.with_dtype(self.precision.dtype)
            to_network_layout(self.network)
        self.smallest = max((downsampling(name, o.backbone) for name in self.layers), default=1)

        self.content = content.to(device, torch.float32)[None]
        # The one place blend weights become shares that sum to 1 (validate() made the sum positive).
        total = sum(weight for _, weight in styles)
        self.styles = [(style.to(device, torch.float32)[None], weight / total) for style, weight in styles]
        if o.color == ColorMode.HISTOGRAM:
            self.styles = [(color.match_colors(s[0], self.content[0])[None], w) for s, w in self.styles]
        # What the optimization works on: RGB, or luminance alone (the chroma is added back at the end).
        self.work_content = self.content
        self.work_styles = self.styles
        if o.color == ColorMode.LUMINANCE:
            self.work_content = color.luminance(self.content)
            self.work_styles = [
                (color.match_luminance(color.luminance(s), self.work_content), w) for s, w in self.styles
            ]

    # ------------------------------------------------------------------ targets

    def _target_features(self, image: Tensor) -> dict[str, Tensor]:
        batch = image.expand(-1, 3, -1, -1)
        found: dict[str, Tensor] = {}
        if self.targets is not None:
            computed = self.targets(batch)
            found = {
                name: computed[name].to(self.device, torch.float32)
                for name in self.layers
                if name in computed
            }
        missing = [name for name in self.layers if name not in found]
        if missing:
            assert self.target_network is not None  # there are layers, so there is a network
            with torch.no_grad():
                features = self.target_network(_network_input(batch))
                found |= {name: f.float() for name, f in features.items() if name in missing}
        return found

    def _style_input(self, style: Tensor, output: tuple[int, int]) -> Tensor:
        """The style at this scale: its own aspect with the longest edge of the output (KEEP_ASPECT), or
        the output's width and height (MATCH_OUTPUT, Gatys et al. 2016), times style_scale."""
        o = self.options
        height, width = style.shape[-2:]
        if o.style_resize == StyleResize.MATCH_OUTPUT:
            w, h = (max(1, round(side * o.style_scale)) for side in output)
        else:
            w, h = schedule.fit(round(max(output) * o.style_scale), (width, height))
        grow = max(1.0, self.smallest / min(w, h))  # tiny or elongated styles still reach the deepest layer
        return _resize(style, round(h * grow), round(w * grow))

    def _style_statistics(
        self,
        style: Tensor,
        output: tuple[int, int],
        statistics: tiles.StatisticFn,
        tile: tiles.TileBounds | None,
    ) -> dict[str, Any]:
        """Per style layer: a Tensor or a tuple of them, whichever the style loss's `statistics` makes
        (and its loss takes, after blend()). A style image larger than `tile` is read by tiles."""
        image = self._style_input(style, output)
        if tile is not None and (image.shape[-2] > tile.rows or image.shape[-1] > tile.columns):
            network = self._tile_network(loop=False)
            names = {name: statistics for name in self.style_layers}
            return tiles.statistics_by_tiles(image, self._grid(image, tile, network), network, names)
        features = self._target_features(image)
        return {name: statistics(features[name], None) for name in self.style_layers}

    def _tile_network(self, *, loop: bool) -> tiles.TileNetwork:
        """The loop's network (in its precision) or the targets' float32 one, on crops."""
        network = self.network if loop else self.target_network
        assert network is not None  # a scale runs tiled only where there are layers
        computes_in = self.precision.precision if loop else Precision.FP32

        def features(crop: Tensor, trim: Trim) -> dict[str, Tensor]:
            with precision.autocast(computes_in, self.device):
                return dict(network(_network_input(crop), trim))

        return tiles.TileNetwork(features, network.context())

    def _grid(
        self,
        image: Tensor,
        bounds: tiles.TileBounds,
        network: tiles.TileNetwork,
        shift: tuple[int, int] = (0, 0),
    ) -> list[tiles.Tile]:
        return tiles.tile_grid(
            *image.shape[-2:],
            bounds=bounds,
            halo=self.options.tile_halo,
            least_rows=network.least_rows,
            shift=shift,
        )

    def _tile_bounds(self, scale: schedule.Scale) -> tiles.TileBounds | None:
        """The tiles of a scale (None: the scale runs whole). For a scale with an edge above the caller's
        tile_size N, tiles of at most N x N pixels: rows of the whole width where they have at least
        least_rows, else N x N cores. Without tile_size, where a whole-image pass would not fit the
        device's free memory, the largest tiles whose passes do."""
        o = self.options
        if self.network is None:
            return None
        if o.tile_size:
            if max(scale.width, scale.height) <= o.tile_size:
                return None
            least_rows = self._tile_network(loop=True).least_rows
            rows = tiles.whole_width_rows(scale.width, o.tile_size**2, least_rows)
            return rows or tiles.TileBounds(o.tile_size, o.tile_size)
        if tiles.whole_image_fits(scale.pixels, self.device):
            return None
        least_rows = self._tile_network(loop=True).least_rows
        return tiles.largest_bounds(scale.width, o.tile_halo, least_rows, self.device)

    def _objective(self, content: Tensor, tile: tiles.TileBounds | None) -> Objective:
        o = self.options
        output = (content.shape[-1], content.shape[-2])
        content_features: dict[str, Tensor] = {}
        if self.content_layers and tile is not None:
            network = self._tile_network(loop=False)
            content_features = tiles.features_by_tiles(
                content, self._grid(content, tile, network), network, self.content_layers
            )
        elif self.content_layers:
            content_features = self._target_features(content)
        content_sum = LayerSum(
            {name: ContentLoss(content_features[name], o.loss_normalization) for name in self.content_layers},
            dict(o.content_layers),
        )
        style_loss = STYLE_LOSSES[o.style_loss]
        per_style = [
            self._style_statistics(style, output, style_loss.statistics, tile)
            for style, _ in (self.work_styles if self.style_layers else [])
        ]
        weights = [weight for _, weight in self.work_styles]
        style_sum = LayerSum(
            {
                name: style_loss(blend([s[name] for s in per_style], weights), o.loss_normalization)
                for name in self.style_layers
            },
            dict(o.style_layers),
        )
        return Objective(
            content_sum,
            style_sum,
            content_weight=o.content_weight,
            style_weight=o.style_weight,
            tv_weight=o.tv_weight,
        ).to(self.device)

    # ------------------------------------------------------------------ optimization

    def _stepper(self, image: Tensor, previous: Stepper | None) -> Stepper:
        o = self.options
        if o.optimizer == Optimizer.LBFGS:
            return LBFGSStepper(image, history=o.lbfgs_history)
        stepper = AdamStepper(image, learning_rate=o.learning_rate, ema_decay=o.ema_decay)
        if isinstance(previous, AdamStepper):
            stepper.continue_from(previous)
        return stepper

    def _evaluate(self, objective: Objective, image: Tensor) -> Tensor:
        """Loss terms at `image`, [total, content, style, tv]."""
        # Calling an nn.Module is untyped (Any); Objective.forward returns a Tensor.
        if self.network is None:
            return cast(Tensor, objective({}, image))
        with precision.autocast(self.precision.precision, self.device):
            features = self.network(_network_input(image))
        return cast(Tensor, objective(features, image))

    def _tiled_terms(
        self,
        objective: Objective,
        image: Tensor,
        tile: tiles.TileBounds,
        shift: tuple[int, int],
        *,
        gradient: bool,
    ) -> Tensor:
        network = self._tile_network(loop=True)
        grid = self._grid(image, tile, network, shift)
        return tiles.tiled_terms(objective, image, grid, network, gradient=gradient)

    def _colored(self, image: Tensor) -> Tensor:
        """The optimized image as the RGB output ([1, 3, H, W])."""
        if self.options.color != ColorMode.LUMINANCE:
            return image
        content = _resize(self.content, *image.shape[-2:])
        return color.with_chroma(image, content)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the job was cancelled")

    def _preview(self, image: Tensor, max_size: int) -> Tensor:
        """The image as a preview: shrunk first, so a large output costs a small copy."""
        height, width = image.shape[-2:]
        if 0 < max_size < max(height, width):
            small_width, small_height = schedule.fit(max_size, (width, height))
            image = _resize(image, small_height, small_width)
        return self._colored(image)[0].cpu()

    def run(
        self, preview_every: int, progress_every: int, preview_max_size: int
    ) -> Iterator[Started | Progress | Result]:
        o = self.options
        start = time.perf_counter()
        plan = schedule.plan_for(o, (self.content.shape[-1], self.content.shape[-2]))
        iterations_total = sum(scale.iterations for scale in plan)
        yield Started(
            scales=tuple((scale.width, scale.height) for scale in plan),
            iterations_total=iterations_total,
            precision=self.precision.precision.value,
            precision_reason=self.precision.reason,
            warnings=(self.precision.warning,) if self.precision.warning else (),
        )
        work_total = sum(scale.iterations * scale.pixels for scale in plan)
        work_done = 0
        iteration = 0
        stepper: Stepper | None = None
        objective: Objective | None = None
        target_seconds = 0.0
        shifts = tiles.moving_shifts(o.seed)
        tile: tiles.TileBounds | None = None
        for index, scale in enumerate(plan):
            self._check_cancel()
            content = _resize(self.work_content, scale.height, scale.width)
            tile = self._tile_bounds(scale)
            targets_began = time.perf_counter()
            objective = self._objective(content, tile)
            target_seconds += time.perf_counter() - targets_began
            if stepper is None:
                image = initial_image(
                    o.init, content[0], [(s[0], w) for s, w in self.work_styles], seed=o.seed
                )[None]
            else:
                image = _resize(stepper.output(), scale.height, scale.width)
            stepper = self._stepper(image, stepper)

            def closure(
                stepper: Stepper = stepper,
                objective: Objective = objective,
                tile: tiles.TileBounds | None = tile,
            ) -> Tensor:
                if tile is not None:
                    return self._tiled_terms(objective, stepper.image, tile, next(shifts), gradient=True)
                terms = self._evaluate(objective, stepper.image)
                terms[0].backward()
                return terms.detach()

            for step in range(1, scale.iterations + 1):
                self._check_cancel()
                terms = stepper.step(closure)
                iteration += 1
                work_done += scale.pixels
                preview_due = preview_every > 0 and iteration % preview_every == 0
                if not (preview_due or iteration % progress_every == 0 or step == scale.iterations):
                    continue
                elapsed = time.perf_counter() - start
                yield Progress(
                    iteration=iteration,
                    iterations_total=iterations_total,
                    scale=index,
                    scales=len(plan),
                    width=scale.width,
                    height=scale.height,
                    losses=finite_losses(terms.tolist(), iteration),
                    elapsed_seconds=elapsed,
                    eta_seconds=elapsed / work_done * (work_total - work_done),
                    image=self._preview(stepper.output(), preview_max_size) if preview_due else None,
                )
        self._check_cancel()
        assert stepper is not None and objective is not None  # the plan has at least one scale
        output = stepper.output()
        if tile is not None:
            final = self._tiled_terms(objective, output, tile, (0, 0), gradient=False)
        else:
            with torch.no_grad():
                final = self._evaluate(objective, output)
        return_image = self._colored(output)[0].cpu()
        yield Result(
            image=return_image,
            losses=finite_losses(final.tolist(), iteration),
            iterations=iteration,
            elapsed_seconds=time.perf_counter() - start,
            target_seconds=target_seconds,
        )
