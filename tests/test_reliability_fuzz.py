"""Fuzzing the request decoder and validator: random and mutated image bytes, random option values.

Every request must end in OK or INVALID_ARGUMENT (naming request fields), or RESOURCE_EXHAUSTED: never
INTERNAL, UNKNOWN, a hang or a crashed server. Two levels:
- in process, many examples: stylize.server.convert.request_from_proto (image decoding, option conversion,
  the engine's validate) and the rich status built from its error, as the service builds it;
- through a real server, a bounded number (FUZZ_SERVER_REQUESTS): the same kind of requests on the wire,
  run to their end. Sizes and iteration counts are kept tiny there so that the requests which are valid
  run in about a second; every other field is as random as in process. Afterwards the server still
  answers health SERVING and logged no traceback.

Image mutations start from real small PNG, JPEG and WebP files: truncation, bit flips, spliced random
tails, and headers claiming huge dimensions (with a valid PNG chunk CRC, so the size check itself is
reached rather than a checksum error).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serverproc import ServerProcess, collect

from stylize.api.options import MAX_RELATIVE_WEIGHT, VGG19_LAYERS, Limits, OptionsError
from stylize.server import convert
from stylize.server.errors import JobStatus
from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

FUZZ_SERVER_REQUESTS = 40
IN_PROCESS_EXAMPLES = 1000
ALLOWED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
# A violation names a request field (with a path below it, e.g. "options.size", "styles[1].image").
REQUEST_FIELDS = tuple(field.name for field in pb.StylizeRequest.DESCRIPTOR.fields)
LIMITS = Limits()


def encoded(image_format: str, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> bytes:
    image = Image.effect_noise(size, 40).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


BASE_IMAGES = [
    encoded("PNG"),
    encoded("PNG", mode="L"),
    encoded("PNG", (20, 20), mode="RGBA"),
    encoded("JPEG"),
    encoded("WEBP"),
]


def truncated(data: bytes, at: int) -> bytes:
    return data[: at % (len(data) + 1)]


def bits_flipped(data: bytes, positions: list[int]) -> bytes:
    mutable = bytearray(data)
    for position in positions:
        bit = position % (8 * len(mutable))
        mutable[bit // 8] ^= 1 << (bit % 8)
    return bytes(mutable)


def png_claiming(width: int, height: int) -> bytes:
    """A real PNG whose IHDR claims width x height, with the chunk's CRC fixed up."""
    data = bytearray(BASE_IMAGES[0])
    # Signature (8 bytes), IHDR length (4) and type (4), then width and height; the CRC follows the
    # 13 bytes of IHDR data and covers the type and the data.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real baseline JPEG whose SOF0 segment claims width x height."""
    data = bytearray(BASE_IMAGES[3])
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


base_images = st.sampled_from(BASE_IMAGES)
image_bytes = st.one_of(
    base_images,
    st.binary(max_size=128),
    st.builds(truncated, base_images, st.integers(0, 10_000)),
    st.builds(bits_flipped, base_images, st.lists(st.integers(0, 100_000), min_size=1, max_size=8)),
    st.builds(lambda data, tail: data[: len(data) // 2] + tail, base_images, st.binary(max_size=64)),
    st.builds(png_claiming, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.builds(jpeg_claiming, st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1)),
)

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def scalar_values(field: FieldDescriptor) -> st.SearchStrategy:
    """Values for one proto field: plausible ones and extremes, from its declared type."""
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        return st.one_of(st.integers(max(low, -2), 600), st.integers(low, high))
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)  # includes nan, inf, -0.0, subnormals
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, len(field.enum_type.values) + 2)  # proto3 enums are open: unknown numbers
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(VGG19_LAYERS), st.text(max_size=20))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return image_bytes
    assert field.type == FieldDescriptor.TYPE_MESSAGE, field.full_name
    return messages(field.message_type)


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor) -> object:
    """A message with each field left unset or set to a drawn value (lists of up to 3 for repeated)."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if field.is_repeated:
            values = draw(st.lists(scalar_values(field), max_size=3))
            container = getattr(message, field.name)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for value in values:
                    container.add().CopyFrom(value)
            else:
                container.extend(values)
        elif draw(st.booleans()):
            value = draw(scalar_values(field))
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(value)
            else:
                setattr(message, field.name, value)
    return message


@st.composite
def requests(draw: st.DrawFn) -> pb.StylizeRequest:
    request = draw(messages(pb.StylizeRequest.DESCRIPTOR))
    # Images deserve more valid cases than the generic strategy gives, so that validation gets past them.
    request.content_image = draw(st.one_of(base_images, image_bytes))
    for style in request.styles:
        style.image = draw(st.one_of(base_images, image_bytes))
    if draw(st.booleans()):
        request.styles.add(image=draw(base_images))
    return request


# The fields that set how much work a job is: kept tiny in what goes through the server.
WORK_FIELDS = ("size", "min_size", "iterations", "initial_iterations", "scale_factor")
OPTION_FIELDS = [f.name for f in pb.StyleOptions.DESCRIPTOR.fields if f.name not in WORK_FIELDS]


@st.composite
def small_requests(draw: st.DrawFn) -> pb.StylizeRequest:
    """Requests whose work, when valid, is a few iterations at <= 48 px (about a second): either wholly
    random requests with the work fields held small, or a valid small request with a few option fields
    (any but the work fields) set to random values, so that many are accepted and run."""
    if draw(st.booleans()):
        request = draw(requests())
        options = request.options
        options.size = draw(st.integers(0, 48))
        options.min_size = draw(st.integers(0, 48))
        options.iterations = draw(st.integers(0, 3))
        options.initial_iterations = draw(st.integers(0, 3))
        # >= 1.2 keeps the number of scales small; 1 and below, and NaN, are refused by validation.
        options.scale_factor = draw(st.one_of(st.floats(1.2, 4.0), st.floats(width=32, max_value=1.0)))
        return request
    size = draw(st.integers(16, 48))
    iterations = draw(st.integers(1, 3))
    request = pb.StylizeRequest(
        content_image=draw(base_images),
        styles=[pb.StyleImage(image=draw(base_images))],
        options=pb.StyleOptions(
            size=size, min_size=size, iterations=iterations, initial_iterations=iterations
        ),
    )
    random_options = draw(messages(pb.StyleOptions.DESCRIPTOR))
    for name in draw(st.lists(st.sampled_from(OPTION_FIELDS), max_size=3, unique=True)):
        value = getattr(random_options, name)
        if pb.StyleOptions.DESCRIPTOR.fields_by_name[name].is_repeated:
            getattr(request.options, name).extend(value)
        else:
            setattr(request.options, name, value)
    if draw(st.booleans()):
        request.preview.CopyFrom(draw(messages(pb.PreviewOptions.DESCRIPTOR)))
    return request


def check_in_process(request: pb.StylizeRequest) -> None:
    try:
        job = convert.request_from_proto(request, LIMITS)
    except OptionsError as error:
        assert error.violations, "an OptionsError without violations"
        for violation in error.violations:
            assert violation.field.startswith(REQUEST_FIELDS), violation
            assert violation.description, violation
        # What the service sends: the rich status must build for any input.
        status = JobStatus.invalid(error).to_rpc_status()
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    else:
        assert job.content.width * job.content.height <= LIMITS.max_input_pixels
        assert len(job.styles) == len(request.styles)
        # The weights as given, each in the validated range, with a positive sum (the engine makes shares).
        weights = [weight for _, weight in job.styles]
        assert all(0 <= weight <= MAX_RELATIVE_WEIGHT for weight in weights) and sum(weights) > 0


@settings(
    max_examples=IN_PROCESS_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests in every run: CI neither flakes nor finds bugs by luck
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(requests())
def test_the_decoder_and_validator_accept_or_name_the_bad_fields_for_any_request(request) -> None:
    check_in_process(request)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (png_claiming(100_000, 100_000), "pixels"),
        (jpeg_claiming(65_535, 65_535), "pixels"),
        (truncated(BASE_IMAGES[0], 60), "could not be decoded"),
        (b"GIF89a" + bytes(32), "not a PNG, JPEG or WebP"),
    ],
    ids=["png-bomb", "jpeg-bomb", "png-truncated", "gif"],
)
def test_mutated_images_are_refused_with_the_reason(data: bytes, expected: str) -> None:
    """The mutations reach the checks they are meant for (else the fuzzing above proves little)."""
    request = pb.StylizeRequest(content_image=data, styles=[pb.StyleImage(image=BASE_IMAGES[0])])
    with pytest.raises(OptionsError) as caught:
        convert.request_from_proto(request, LIMITS)
    assert [v.field for v in caught.value.violations] == ["content_image"]
    assert expected in caught.value.violations[0].description


@pytest.fixture(scope="module")
def fuzzed_server(model_dir) -> Iterator[ServerProcess]:
    with ServerProcess(model_dir, "--device", "cpu", "--workers", "1", "--grace-seconds", "5") as process:
        yield process


@pytest.fixture(scope="module")
def fuzzed_stub(fuzzed_server) -> Iterator[stylize_pb2_grpc.StyleTransferStub]:
    with grpc.insecure_channel(fuzzed_server.address) as channel:
        yield stylize_pb2_grpc.StyleTransferStub(channel)


@settings(
    max_examples=FUZZ_SERVER_REQUESTS,
    deadline=None,
    derandomize=True,  # the same requests in every run: a server-side failure reproduces
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(request=small_requests())
def test_fuzzed_requests_through_the_server_end_in_ok_or_a_client_error(fuzzed_stub, request) -> None:
    events, code = collect(fuzzed_stub.Stylize(request, timeout=60))
    assert code in ALLOWED_CODES, (code, request)
    if code == grpc.StatusCode.OK:
        assert events[-1].HasField("completed")


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff\xda\x00\x03",
        b"RIFF\0\0\0\0WEBPVP8 ",
        b"\x89PNG\r\n\x1a\n\0\0\0\0IHDR",
        truncated(BASE_IMAGES[0], 20),
    ],
    ids=["jpeg-scan-without-header", "webp-empty-vp8", "png-empty-ihdr", "png-cut-in-ihdr"],
)
def test_images_that_break_pil_at_open_are_invalid_arguments(data: bytes) -> None:
    """Inputs the fuzzing above found (PIL raised OSError or ValueError while opening them, and the call
    ended UNKNOWN until server/codec.py caught those), kept as plain regression cases."""
    request = pb.StylizeRequest(content_image=data, styles=[pb.StyleImage(image=BASE_IMAGES[0])])
    with pytest.raises(OptionsError) as caught:
        convert.request_from_proto(request, LIMITS)
    assert [v.field for v in caught.value.violations] == ["content_image"]


@pytest.mark.parametrize("method", ["Stylize", "SubmitJob"])
def test_request_bytes_that_are_not_a_stylize_request_are_invalid_arguments(fuzzed_server, method) -> None:
    corrupt = b"\x0a\xff\xff\xff\xff\x0f"  # field 1 (content_image), a length far beyond the message
    with grpc.insecure_channel(fuzzed_server.address) as channel:
        path = f"/stylize.v1.StyleTransfer/{method}"
        if method == "Stylize":
            _, code = collect(channel.unary_stream(path)(corrupt, timeout=30))
        else:
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(path)(corrupt, timeout=30)
            code = caught.value.code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_fuzzed_server_still_serves_with_no_job_left_and_logged_no_traceback(
    fuzzed_server, fuzzed_stub
) -> None:
    """Runs after the fuzzing above (pytest keeps the file's order)."""
    assert fuzzed_server.process.poll() is None
    assert fuzzed_server.health() == "SERVING"
    queue = fuzzed_stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).queue
    assert (queue.depth, queue.running) == (0, 0)
    assert "Traceback" not in fuzzed_server.log()
