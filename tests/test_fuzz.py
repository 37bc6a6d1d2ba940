"""Property-based tests (Hypothesis) through a real server: hostile requests for every RPC (issue 13).

For every method of headserve.v1.HeadServe and headserve.v1.Admin (enumerated from the descriptors), three
kinds of request go over a raw channel (bytes in, bytes out), each call with a deadline:

- random:  random bytes as the serialized request (a stream: one to three of them);
- mutated: valid seed messages built with real values (this module's own tasks, jobs, tenants and keys),
           mutated at the byte level: bit flips, interesting bytes, truncation, deletion, insertion,
           duplication, splicing with another seed, overlong varints;
- message: structured random messages drawn from the message descriptor: every field may be set, with
           known-good values (task ids, labels, backbones, images...) or hostile ones (huge and unicode
           strings, NUL, negative and boundary integers, NaN/inf floats, unknown enum values, empty and
           huge repeated fields within the message size limit).

Mutated valid images (JPEG/PNG/WebP/GIF made here with PIL, with fuzzed header fields, raw fuzzed EXIF
blocks and byte mutations) go to Predict on `image_task` and to CreateTask on mobilenet_v3_small.

Every answer must be something other than INTERNAL or UNKNOWN, with a status message within the cap that
the client can read; no call may outlive its deadline by more than a margin; after each test the server
answers the gRPC health check SERVING and a known-good Predict on `text_task` correctly. Besides: hostile
quotas (NaN, inf, huge, negative) and the tenant's calls under them; request streams that stall past their
deadline, more at once than the server has RPC threads; and no fuzzed training job fails "internal error".

Found by these tests, fixed, and kept as regression tests here: status messages quoting wide characters
(1000 emoji: a 12 KB percent-encoded trailer the client refused, so the caller saw RESOURCE_EXHAUSTED
instead of the real error), and NaN rate quotas (accepted and stored, then every Predict was refused).

Safety, since the suite shares one server: HeadServe fuzzing calls as a tenant of its own (train key), so
it can only see or delete what this module created; its quotas bound what it can store and train (one
training job at a time), and CreateTask/TrainTask requests that would start a long job (fine-tuning, many
epochs, many examples) are parsed and dropped before they are sent. Admin fuzzing uses an admin key, and a
request that would change or delete a tenant or key (DeleteTenant, SetQuotas, CreateKey, RevokeKey) is
parsed and dropped unless it names one of this module's throwaway tenants and keys (or nothing that exists).

Profiles (registered here): `make test` runs the short one, derandomized and without an example database
(the same examples every run; about 2,300 calls, well under 2 minutes); `HEADSERVE_FUZZ=long` (`make fuzz`)
runs 20 times the examples with fresh randomness each run (a failure prints the blob that reproduces it);
HEADSERVE_FUZZ_SCALE=N multiplies either. Run with -s for a table of the answers by method and status.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Sequence

import grpc
import pytest
from conftest import TOPICS, Client, Tenant, make_tenant, png, text_examples, unique_id
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from service.client import open_channel
from service.errors import MAX_MESSAGE
from service.gen import headserve_pb2 as pb
from service.store import Quotas

# --- profiles ----------------------------------------------------------------------------------------

_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture, HealthCheck.large_base_example],
)
settings.register_profile("headserve-fuzz-short", derandomize=True, max_examples=10, **_COMMON)
settings.register_profile("headserve-fuzz-long", derandomize=False, max_examples=200, **_COMMON)
LONG = os.environ.get("HEADSERVE_FUZZ", "").lower() == "long"
PROFILE = "headserve-fuzz-long" if LONG else "headserve-fuzz-short"
SCALE = float(os.environ.get("HEADSERVE_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    """This module's profile, with `examples` examples in the short profile (20x in the long one)."""
    n = examples * (20 if LONG else 1)
    return settings(settings.get_profile(PROFILE), max_examples=max(1, int(n * SCALE)))


# --- the methods, from the descriptors ---------------------------------------------------------------

SERVICES = [pb.DESCRIPTOR.services_by_name[name] for name in ("HeadServe", "Admin")]
METHODS = {f"/{s.full_name}/{m.name}": m for s in SERVICES for m in s.methods}
assert len(METHODS) == sum(len(s.methods) for s in SERVICES) and len(METHODS) >= 19
HEADSERVE = f"/{SERVICES[0].full_name}/"
ADMIN = f"/{SERVICES[1].full_name}/"
ADMIN_READS = frozenset({"ListTenants", "GetTenant", "ListKeys", "GetUsage"})  # change nothing
READ_ONLY = frozenset(HEADSERVE + m for m in (
    "ListBackbones", "GetTask", "ListTasks", "Predict", "PredictStream", "WatchJob", "ExportTask"))


def request_class(method):
    return getattr(pb, method.input_type.name)


TIMEOUT = 30.0  # seconds, every fuzzed call (a loaded 2-core machine runs a 256-input Predict in a few)
MARGIN = 10.0  # how far past its deadline a call may end on a loaded machine before it counts as a hang
MAX_REQUEST_BYTES = 8 << 20  # structured messages stay well within the server's 64 MiB
BAD = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
FUZZER_QUOTAS = Quotas(examples=400, stored_bytes=64 << 20, training_jobs=1)  # the fuzzing tenant's limits
STATS: collections.Counter = collections.Counter()  # (method, status) -> calls; printed with -s
DETAILS: collections.defaultdict = collections.defaultdict(collections.Counter)  # (method, status) -> gists


def _gist(details: str) -> str:
    """A status message with quoted values elided, to count the kinds of answer."""
    return re.sub(r"'[^']*'(\.\.\.)?|\"[^\"]*\"|\d+", "_", details)[:90]


@dataclasses.dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    seconds: float


def _raw(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def invoke(channel: grpc.Channel, path: str, request, timeout: float = TIMEOUT) -> Outcome:
    """Calls `path` with a request (bytes or a message; a list or an iterator of them for a client stream)
    over a raw channel, and reads every response (as bytes)."""
    method = METHODS.get(path)
    streaming_in = method.client_streaming if method else False
    streaming_out = method.server_streaming if method else False
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    rpc = kinds[(streaming_in, streaming_out)](path, request_serializer=lambda b: b,
                                                response_deserializer=lambda b: b)
    if isinstance(request, (list, tuple)):
        arg = iter([_raw(m) for m in request])
    else:
        arg = request if streaming_in else _raw(request)  # a client stream may come as an iterator
    start = time.monotonic()
    responses: list[bytes] = []
    try:
        if streaming_out:
            for response in rpc(arg, timeout=timeout):
                responses.append(response)
        else:
            responses.append(rpc(arg, timeout=timeout))
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    return Outcome(code, details, responses, time.monotonic() - start)


def check(outcome: Outcome, what: str, timeout: float = TIMEOUT) -> None:
    assert outcome.code not in BAD, f"{what}: {outcome.code.name} {outcome.details[:300]!r}"
    assert outcome.seconds <= timeout + MARGIN, f"{what}: took {outcome.seconds:.1f}s (deadline {timeout}s)"
    assert len(outcome.details) <= MAX_MESSAGE, f"{what}: status message of {len(outcome.details)} characters"
    assert "exceeds soft limit" not in outcome.details, f"{what}: {outcome.details[:300]!r}"


def show(request: bytes | Sequence[bytes]) -> str:
    def one(b: bytes) -> str:
        return repr(b) if len(b) <= 400 else f"{b[:400]!r}... ({len(b)} bytes)"
    return one(request) if isinstance(request, bytes) else "[" + ", ".join(one(b) for b in request) + "]"


# --- images ------------------------------------------------------------------------------------------


def encoded(fmt: str, mode: str = "RGB", size=(40, 32), seed: int = 1, **save) -> bytes:
    img = Image.open(io.BytesIO(png((200, 60, 30), size=size, noise=30, seed=seed)))
    img = img.convert(mode)
    buf = io.BytesIO()
    if fmt == "GIF":
        frames = [img.convert("P"), img.rotate(90).convert("P")]
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], loop=0, duration=50,
                       **save)
    else:
        img.save(buf, format=fmt, **save)
    return buf.getvalue()


BASE_IMAGES: dict[str, list[bytes]] = {
    "JPEG": [encoded("JPEG"), encoded("JPEG", "L"), encoded("JPEG", "CMYK"),
             encoded("JPEG", progressive=True), encoded("JPEG", size=(300, 200))],
    "PNG": [encoded("PNG"), encoded("PNG", "RGBA"), encoded("PNG", "P"), encoded("PNG", "I;16"),
            encoded("PNG", "1"), encoded("PNG", "LA")],
    "WEBP": [encoded("WEBP"), encoded("WEBP", lossless=True), encoded("WEBP", "RGBA")],
    "GIF": [encoded("GIF"), encoded("GIF", size=(64, 8))],
}
SMALL_IMAGES = [BASE_IMAGES["PNG"][0], BASE_IMAGES["JPEG"][0], BASE_IMAGES["WEBP"][0], BASE_IMAGES["GIF"][0]]

ORIENTATION, EXIF_IFD = 0x0112, 0x8769
EXIF_TAGS = [ORIENTATION, 0x011A, 0x011B, 0x0128, EXIF_IFD, 0x8825, 0xA005, 0x0131, 0x0132, 0x927C, 0x0213,
             0x0100, 0x0101, 0x0201, 0x0202]
# BYTE ASCII SHORT LONG RATIONAL UNDEFINED SLONG SRATIONAL FLOAT DOUBLE
EXIF_TYPES = [1, 2, 3, 4, 5, 7, 9, 10, 11, 12]


@st.composite
def tiff_blocks(draw) -> bytes:
    """A raw EXIF (TIFF) block: random IFD entries (tags, types, counts, values and offsets that may point
    anywhere, including back at the IFD itself), often with an Orientation entry, and trailing bytes."""
    little = draw(st.booleans())
    e = "<" if little else ">"
    u32 = st.one_of(st.sampled_from([0, 1, 2, 6, 8, 26, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]),
                    st.integers(0, 0xFFFFFFFF))
    entries = draw(st.lists(st.tuples(
        st.one_of(st.sampled_from(EXIF_TAGS), st.integers(0, 0xFFFF)),
        st.one_of(st.sampled_from(EXIF_TYPES), st.integers(0, 0xFFFF)),
        u32, u32), max_size=8))
    body = b""
    orientation = draw(st.one_of(st.none(), st.integers(0, 9), st.integers(0, 0xFFFF)))
    if orientation is not None:
        typ = draw(st.sampled_from([3, 3, 3, 2, 4, 5, 7]))  # SHORT, or mistyped as text, long, rational...
        body += struct.pack(e + "HHI", ORIENTATION, typ, draw(st.sampled_from([1, 1, 2, 0, 0xFFFFFFFF])))
        body += struct.pack(e + "HH", orientation, 0) if typ == 3 else struct.pack(e + "I", orientation)
    for tag, typ, count, value in entries:
        body += struct.pack(e + "HHII", tag, typ, count, value)
    n = len(entries) + (orientation is not None)
    declared = draw(st.one_of(st.just(n), st.sampled_from([0, 0xFFFF]), st.integers(0, 0xFFFF)))
    first = draw(st.one_of(st.just(8), st.sampled_from([0, 4, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF)))
    next_ifd = draw(st.one_of(st.just(0), st.sampled_from([8, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF)))
    header = (b"II*\x00" if little else b"MM\x00*") + struct.pack(e + "I", first)
    return header + struct.pack(e + "H", declared) + body + struct.pack(e + "I", next_ifd) + \
        draw(st.binary(max_size=64))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def with_exif(fmt: str, base: bytes, tiff: bytes) -> bytes:
    if fmt == "JPEG":  # APP1 "Exif\0\0" right after SOI
        payload = b"Exif\x00\x00" + tiff[:65000]
        return base[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + base[2:]
    if fmt == "PNG":  # an eXIf chunk right after IHDR
        return base[:33] + png_chunk(b"eXIf", tiff) + base[33:]
    if fmt == "WEBP":  # PIL writes a VP8X header and an EXIF chunk
        buf = io.BytesIO()
        Image.open(io.BytesIO(base)).save(buf, format="WEBP", exif=b"Exif\x00\x00" + tiff)
        return buf.getvalue()
    # GIF has no EXIF: a comment extension and an application extension with the bytes instead
    body = tiff[:255]
    return base[:13] + b"\x21\xfe" + bytes([len(body)]) + body + b"\x00" + \
        b"\x21\xff\x0bNETSCAPE2.0" + bytes([min(len(body), 255)]) + body + b"\x00" + base[13:]


DIMENSION = st.one_of(st.sampled_from([0, 1, 2, 7, 8, 255, 256, 257, 12000, 65535]), st.integers(0, 0xFFFF))


def with_dimensions(draw, fmt: str, data: bytes) -> bytes:
    """Rewrites the header's size fields (and a few neighbours) with drawn values; PNG's CRC is fixed up so
    that the decoder gets past the chunk check."""
    b = bytearray(data)
    if fmt == "PNG" and len(b) >= 33:
        big = st.one_of(DIMENSION, st.integers(0, 0xFFFFFFFF))
        b[16:24] = struct.pack(">II", draw(big), draw(big))
        if draw(st.booleans()):
            b[24] = draw(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 255]))  # bit depth
            b[25] = draw(st.sampled_from([0, 2, 3, 4, 6, 7, 255]))  # colour type
            b[28] = draw(st.sampled_from([0, 1, 2]))  # interlace
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    elif fmt == "JPEG":
        at = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
        if at >= 0 and at + 10 <= len(b):
            b[at + 5:at + 9] = struct.pack(">HH", draw(DIMENSION), draw(DIMENSION))
            if draw(st.booleans()):
                b[at + 4] = draw(st.sampled_from([0, 8, 12, 16, 255]))  # precision
                b[at + 9] = draw(st.sampled_from([0, 1, 3, 4, 255]))  # components
    elif fmt == "GIF" and len(b) >= 13:
        b[6:10] = struct.pack("<HH", draw(DIMENSION), draw(DIMENSION))
        b[10] = draw(st.integers(0, 255))  # packed: global colour table flag and size
        at = data.find(b"\x2c", 13)
        if at >= 0 and at + 9 <= len(b):
            b[at + 1:at + 9] = struct.pack("<HHHH", *(draw(DIMENSION) for _ in range(4)))
    elif fmt == "WEBP" and len(b) >= 30:
        b[4:8] = struct.pack("<I", draw(st.one_of(st.just(len(b) - 8), st.integers(0, 0xFFFFFFFF))))
        kind = bytes(b[12:16])
        if kind == b"VP8X":
            b[24:30] = struct.pack("<I", draw(st.integers(0, 0xFFFFFF)))[:3] + \
                struct.pack("<I", draw(st.integers(0, 0xFFFFFF)))[:3]
        elif kind == b"VP8L":
            b[21:25] = struct.pack("<I", draw(st.integers(0, 0xFFFFFFFF)))
        elif kind == b"VP8 ":
            b[26:30] = struct.pack("<HH", draw(DIMENSION), draw(DIMENSION))
    return bytes(b)


@st.composite
def hostile_images(draw) -> tuple[str, bytes]:
    """A valid JPEG/PNG/WebP/GIF made with PIL, then (each maybe) with a fuzzed EXIF block, fuzzed header
    fields and byte-level mutations (in the header, or anywhere)."""
    fmt = draw(st.sampled_from(sorted(BASE_IMAGES)))
    data = draw(st.sampled_from(BASE_IMAGES[fmt]))
    if draw(st.booleans()):
        data = with_exif(fmt, data, draw(tiff_blocks()))
    if draw(st.booleans()):
        data = with_dimensions(draw, fmt, data)
    if draw(st.booleans()):
        region = draw(st.sampled_from([64, 256, len(data)]))
        head = mutate(data[:region], draw(mutation_ops()), SMALL_IMAGES)
        data = head + data[region:]
    return fmt, data


# --- byte-level mutation -----------------------------------------------------------------------------

OPS = ("flip", "set", "truncate", "delete", "insert", "duplicate", "splice", "varint")
INTERESTING = (0x00, 0x01, 0x02, 0x07, 0x08, 0x0A, 0x12, 0x1A, 0x22, 0x7F, 0x80, 0xFE, 0xFF)


def mutation_ops(max_ops: int = 5):
    op = st.tuples(st.sampled_from(OPS), st.integers(0, 1 << 20), st.integers(0, 1 << 20),
                   st.binary(min_size=1, max_size=24), st.integers(0, 1 << 10))
    return st.lists(op, min_size=1, max_size=max_ops)


def mutate(data: bytes, ops, donors: Sequence[bytes]) -> bytes:
    """Applies the ops to `data`; positions are taken modulo the current length; `splice` joins a prefix of
    the data with a suffix of one of the donors."""
    b = bytearray(data)
    for name, x, y, blob, which in ops:
        n = len(b)
        pos = x % (n + 1)
        if name == "flip" and n:
            b[x % n] ^= 1 << (y % 8)
        elif name == "set" and n:
            b[x % n] = INTERESTING[y % len(INTERESTING)]
        elif name == "truncate":
            del b[pos:]
        elif name == "delete":
            del b[pos:pos + 1 + y % 16]
        elif name == "insert":
            b[pos:pos] = blob
        elif name == "duplicate":
            b[pos:pos] = bytes(b[pos:pos + 1 + y % 64]) * (1 + y % 4)
        elif name == "splice" and donors:
            donor = donors[which % len(donors)]
            b = b[:pos] + bytearray(donor[y % (len(donor) + 1):])
        elif name == "varint":  # an overlong varint or a huge length prefix
            b[pos:pos] = b"\xff" * (1 + y % 11) + bytes([y % 0x80])
    return bytes(b)


# --- structured messages from descriptors -----------------------------------------------------------

INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1), FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
EDGES = (0, 1, -1, 2, 3, 5, 8, 16, 100, 128, 129, 256, 257, 1000, 1001, 8192, 8193, 10_000, 10_001, 100_000,
         2**31 - 1, -(2**31), 2**32 - 1, 2**53, 2**63 - 1, -(2**63))
SPECIAL_STRINGS = ("", " ", "\x00", "a\x00b", "\t\n", "\u200b", "\u202e", "\ufeff", "🙂", "é", "Ω" * 3,
                   "../../../etc/passwd", "%s%n%x", "'; DROP TABLE tasks; --", "NULL", "null", "NaN", "-1",
                   "a" * 128, "a" * 129, "x" * 1001, "last", "last-1", "last+last-1+last-2+last-3",
                   "predict", "train", "admin", "*", "tn-000000000000", "job-000000000000", "task-",
                   "hsk_0123456789ab_" + "A" * 43)
HUGE_LENGTHS = (101, 1001, 20_001, 100_000, 1_000_000)


def strings(pool: Sequence[str] = ()) -> st.SearchStrategy[str]:
    choices = [st.text(max_size=40), st.sampled_from(SPECIAL_STRINGS),
               st.builds(lambda c, n: c * n, st.sampled_from(["a", "Z", "9", "-", "é", "\x00", "🙂", " "]),
                         st.sampled_from(HUGE_LENGTHS))]
    if pool:
        choices.insert(0, st.sampled_from(list(pool)))
    return st.one_of(*choices)


def binaries() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=64), st.sampled_from(SMALL_IMAGES),
                     hostile_images().map(lambda t: t[1]),
                     st.builds(lambda n: b"\x00" * n, st.sampled_from([1, 1000, 1_000_000])))


def integers(lo: int, hi: int, pool: Sequence[int] = ()) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (*EDGES, *pool, lo, hi, lo + 1, hi - 1) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def many(value, n: int) -> list:
    """`n` copies of `value`, fewer when they would pass MAX_REQUEST_BYTES (huge, within the size limit)."""
    if hasattr(value, "ByteSize"):
        size = value.ByteSize()
    elif isinstance(value, (str, bytes)):
        size = len(value.encode() if isinstance(value, str) else value)
    else:
        size = 8
    return [value] * min(n, MAX_REQUEST_BYTES // (size + 3))


def assign(msg, field, value) -> None:
    """Sets `field` of `msg` to `value` (a list for a repeated field, a dict for a map), replacing it."""
    msg.ClearField(field.name)
    target = getattr(msg, field.name) if (field.is_repeated or field.type == FD.TYPE_MESSAGE) else None
    if isinstance(value, dict):
        for k, v in value.items():
            if hasattr(v, "SerializeToString"):
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif field.is_repeated:
        target.extend(value)
    elif field.type == FD.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(msg, field.name, value)


class Shapes:
    """Hypothesis strategies for the messages of a descriptor, with per-field-name pools of real values
    (so that random messages also reach past "not found")."""

    def __init__(self, strings_by_field: dict[str, Sequence[str]],
                 ints_by_field: dict[str, Sequence[int]]) -> None:
        self.strings_by_field = strings_by_field
        self.ints_by_field = ints_by_field
        self._cache: dict[tuple[str, int], st.SearchStrategy] = {}

    def value(self, field, depth: int) -> st.SearchStrategy:
        t = field.type
        if t == FD.TYPE_MESSAGE:
            return self.message(field.message_type, depth + 1)
        if t == FD.TYPE_ENUM:
            return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]),
                             integers(-(2**31), 2**31 - 1))
        if t == FD.TYPE_STRING:
            return strings(self.strings_by_field.get(field.name, ()))
        if t == FD.TYPE_BYTES:
            return binaries()
        if t == FD.TYPE_BOOL:
            return st.booleans()
        if t == FD.TYPE_FLOAT:
            return st.one_of(st.sampled_from([0.0, -0.0, 0.5, 1.0, -1.0, float("nan"), float("inf"),
                                              float("-inf"), 1e-45, 3.4e38]), st.floats(width=32))
        if t == FD.TYPE_DOUBLE:
            return st.one_of(st.sampled_from([0.0, 0.5, 1.0, -1.0, float("nan"), float("inf"), float("-inf"),
                                              5e-324, 1.7976931348623157e308]), st.floats())
        lo, hi = INT_RANGES[t]
        return integers(lo, hi, self.ints_by_field.get(field.name, ()))

    def field(self, field, depth: int) -> st.SearchStrategy:
        if field.is_repeated and field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            entry = field.message_type
            return st.dictionaries(self.value(entry.fields_by_name["key"], depth),
                                   self.value(entry.fields_by_name["value"], depth), max_size=4)
        if field.is_repeated:
            one = self.value(field, depth)
            return st.one_of(st.lists(one, max_size=4),
                             st.builds(many, one, st.sampled_from([0, 33, 65, 257, 1001, 5000, 100_000])))
        return self.value(field, depth)

    def message(self, descriptor, depth: int = 0) -> st.SearchStrategy:
        key = (descriptor.full_name, depth)
        if key not in self._cache:
            self._cache[key] = self._message(descriptor, depth)
        return self._cache[key]

    def _message(self, descriptor, depth: int) -> st.SearchStrategy:
        cls = getattr(pb, descriptor.name)
        if depth > 3:
            return st.just(cls())
        plain = [f for f in descriptor.fields if f.containing_oneof is None]
        parts = {f.name: st.one_of(st.none(), self.field(f, depth)) for f in plain}
        oneofs = {
            o.name: st.one_of(st.none(), *(st.tuples(st.just(f.name), self.value(f, depth))
                                           for f in o.fields))
            for o in descriptor.oneofs
        }

        def build(values: dict, chosen: dict):
            msg = cls()
            for name, value in [*values.items(), *(c for c in chosen.values() if c is not None)]:
                if value is not None:
                    assign(msg, descriptor.fields_by_name[name], value)
            return msg

        return st.builds(build, st.fixed_dictionaries(parts), st.fixed_dictionaries(oneofs))

    def perturb(self, msg, data, depth: int = 0) -> None:
        """Replaces one to three fields of a (seed) message in place with drawn values, or recurses into
        a set message field or one element of a repeated one: a valid request with a few hostile parts."""
        descriptor = msg.DESCRIPTOR
        if not descriptor.fields:  # an empty message: nothing to replace
            return
        chosen = data.draw(st.lists(st.sampled_from(list(descriptor.fields)), min_size=1, max_size=3,
                                    unique_by=lambda f: f.name))
        for f in chosen:
            if f.type == FD.TYPE_MESSAGE and depth < 3 and data.draw(st.booleans()):
                if not f.is_repeated and msg.HasField(f.name):
                    self.perturb(getattr(msg, f.name), data, depth + 1)
                    continue
                items = getattr(msg, f.name)
                if f.is_repeated and not f.message_type.GetOptions().map_entry and len(items):
                    self.perturb(items[data.draw(st.integers(0, len(items) - 1))], data, depth + 1)
                    continue
            assign(msg, f, data.draw(self.field(f, depth)))


# --- the world the fuzzer works in -------------------------------------------------------------------


@dataclasses.dataclass(repr=False)
class World:
    address: str
    fuzzer: Tenant  # HeadServe fuzzing: its own tenant with a train key
    admin: Tenant  # Admin fuzzing: an admin key
    train: grpc.Channel
    admin_channel: grpc.Channel
    suite: grpc.Channel  # the suite tenant's key: read-only calls only
    ready_text: str
    ready_image: str
    add_target: str  # declares labels sports and cooking
    quota_tenant: Tenant  # a tenant (train key) whose quotas the quota test sets to hostile values
    quota_channel: grpc.Channel
    keep_tasks: frozenset[str]  # never deleted by the fuzzer (the seeds' Predict/Export targets)
    modality: dict[str, str]  # backbone -> text|image
    seeds: dict[str, list[list[bytes]]]  # method path -> seed requests (each a list of messages)
    shapes: Shapes
    throwaway_refs: set[str]  # ids and names of throwaway tenants; key ids of throwaway keys
    created: list[str]  # tenant ids the fuzzer's CreateTenant made
    missing_seeds: list[str]  # methods with no seed built from real values (they start from empty messages)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __repr__(self) -> str:  # Hypothesis prints the test's arguments: not the seeds' megabytes
        return f"World(fuzzer={self.fuzzer.tenant_id}, admin={self.admin.tenant_id})"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))

    def channel(self, path: str, key: str) -> grpc.Channel:
        """The channel for `key`: "own" (the fuzzing tenant's train key for HeadServe, the admin key for
        Admin), "suite" (the suite tenant's key, for read-only HeadServe methods), "other" (the other
        service's key: PERMISSION_DENIED)."""
        admin = path.startswith(ADMIN)
        if key == "suite" and path in READ_ONLY:
            return self.suite
        if key == "other":
            admin = not admin
        return self.admin_channel if admin else self.train


def _ready(client: Client, task_id: str) -> pb.Job:
    job = client.wait_ready(task_id)
    assert job.state == pb.Job.SUCCEEDED, job.error
    return job


@pytest.fixture(scope="module")
def world(server, tenant, text_task, image_task):
    fuzzer = make_tenant(server, unique_id("fuzzer"))
    admin = make_tenant(server, unique_id("fuzz-admin"), scopes=("admin",))
    own = Client(server.address, fuzzer.api_key)
    few = {label: texts[:3] for label, texts in TOPICS.items()}
    ready_text, ready_image = unique_id("fz-text"), unique_id("fz-image")
    colours = {"red": (220, 30, 30), "blue": (30, 40, 220)}
    image_examples = [pb.Example(input=pb.Input(image=png(rgb, noise=20, seed=i)), label=label)
                      for label, rgb in colours.items() for i in range(2)]
    fast = pb.TrainingConfig(strategy=pb.PROTOTYPE, label_text=pb.LABEL_TEXT_OFF)
    own.stub.CreateTask(pb.CreateTaskRequest(task_id=ready_text, backbone="minilm-l6",
                                             examples=text_examples(few), config=fast), timeout=60)
    text_job = _ready(own, ready_text)
    own.stub.CreateTask(pb.CreateTaskRequest(task_id=ready_image, backbone="mobilenet_v3_small",
                                             examples=image_examples,
                                             config=pb.TrainingConfig(strategy=pb.PROTOTYPE)), timeout=60)
    image_job = _ready(own, ready_image)
    # Bounds on what fuzzed calls can make the server hold and run for this tenant.
    server.admin.set_quotas(fuzzer.tenant_id, FUZZER_QUOTAS)
    add_target, train_target = unique_id("fz-add"), unique_id("fz-train")
    own.stub.CreateTask(pb.CreateTaskRequest(task_id=add_target, backbone="minilm-l6",
                                             labels=["sports", "cooking"]), timeout=60)
    own.stub.CreateTask(pb.CreateTaskRequest(task_id=train_target, backbone="minilm-l6"), timeout=60)
    own.stub.AddExamples(iter([pb.AddExamplesRequest(task_id=train_target, examples=text_examples(
        {k: v[:2] for k, v in TOPICS.items()}))]), timeout=60)
    doomed = [unique_id("fz-doomed") for _ in range(3)]
    for task_id in doomed:
        own.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="mobilenet_v3_small"), timeout=60)
    own.close()

    quota_tenant = make_tenant(server, unique_id("fz-quota"))
    throwaway = [server.admin.create_tenant(unique_id("fz-tn"), ["predict"]) for _ in range(4)]
    extra_keys = [server.admin.create_key(t.tenant_id, ["predict"])[0] for t, _, _ in throwaway]
    refs = {t.tenant_id for t, _, _ in throwaway} | {t.name for t, _, _ in throwaway}
    refs |= {k.key_id for _, k, _ in throwaway} | {k.key_id for k in extra_keys}
    tn = [t for t, _, _ in throwaway]

    text_inputs = [pb.Input(text=t) for t in ("The striker scored.", "Bake the bread.")]
    two_labels = [pb.Example(input=pb.Input(text="A goal in extra time."), label="sports"),
                  pb.Example(input=pb.Input(text="Fry the onions."), label="cooking")]
    later = int(time.time() * 1000) + 3_600_000
    seeds_by_method: dict[str, list] = {
        "ListBackbones": [pb.ListBackbonesRequest()],
        "CreateTask": [
            pb.CreateTaskRequest(task_id=unique_id("fz-new"), backbone="minilm-l6", examples=two_labels,
                                 labels=["sports", "cooking"], config=fast),
            pb.CreateTaskRequest(task_id=unique_id("fz-new"), backbone="mobilenet_v3_small",
                                 examples=image_examples,
                                 config=pb.TrainingConfig(strategy=pb.LINEAR, epochs=3, tap="last",
                                                          reject_threshold=0.2)),
            pb.CreateTaskRequest(backbone="minilm-l6", config=pb.TrainingConfig(
                strategy=pb.MLP, hidden_units=8, epochs=2, label_text=pb.LABEL_TEXT_ON,
                label_descriptions={"HUM": "a person"}), labels=["HUM", "LOC"]),
        ],
        "AddExamples": [
            [pb.AddExamplesRequest(task_id=add_target, examples=two_labels),
             pb.AddExamplesRequest(examples=two_labels[:1])],
            [pb.AddExamplesRequest(task_id=doomed[0], examples=image_examples[:1])],
        ],
        "TrainTask": [pb.TrainTaskRequest(task_id=train_target, config=fast),
                      pb.TrainTaskRequest(task_id=add_target)],
        "WatchJob": [pb.WatchJobRequest(job_id=text_job.job_id), pb.WatchJobRequest(task_id=ready_image)],
        "GetTask": [pb.GetTaskRequest(task_id=ready_text)],
        "ListTasks": [pb.ListTasksRequest(page_size=2, page_token=ready_text, backbone="minilm-l6")],
        "DeleteTask": [pb.DeleteTaskRequest(task_id=t) for t in doomed],
        "Predict": [
            pb.PredictRequest(task_id=ready_text, inputs=text_inputs, top_k=2, request_id="r-1"),
            pb.PredictRequest(task_ids=[ready_text, train_target], inputs=text_inputs[:1]),
            pb.PredictRequest(task_id=ready_image, inputs=[pb.Input(image=SMALL_IMAGES[0])], top_k=1),
        ],
        "PredictStream": [[pb.PredictRequest(task_id=ready_text, inputs=text_inputs, request_id="s-1"),
                           pb.PredictRequest(task_id=ready_image, inputs=[pb.Input(image=SMALL_IMAGES[1])])]],
        "ExportTask": [pb.ExportTaskRequest(task_id=ready_text, format=pb.HEAD_ONNX),
                       pb.ExportTaskRequest(task_id=ready_image, format=pb.FUSED_ONNX, version=1)],
        "CreateTenant": [pb.CreateTenantRequest(name=unique_id("fz-made"), scopes=["predict"],
                                                expires_at_ms=later)],
        "ListTenants": [pb.ListTenantsRequest(), pb.ListTenantsRequest(page_size=2, page_token=tn[0].name)],
        "GetTenant": [pb.GetTenantRequest(tenant=tn[0].name), pb.GetTenantRequest(tenant=tn[1].tenant_id)],
        "DeleteTenant": [pb.DeleteTenantRequest(tenant=tn[2].tenant_id),
                         pb.DeleteTenantRequest(tenant=tn[3].name)],
        "SetQuotas": [pb.SetQuotasRequest(tenant=tn[0].tenant_id, quotas=pb.Quotas(
            tasks=5, examples=100, stored_bytes=1 << 20, training_jobs=1, predict_requests_per_second=2.5,
            predict_inputs_per_second=10))],
        "CreateKey": [pb.CreateKeyRequest(tenant=tn[1].name, scopes=["predict", "train"], description="fuzz",
                                          expires_at_ms=later)],
        "ListKeys": [pb.ListKeysRequest(tenant=tn[0].tenant_id), pb.ListKeysRequest(),
                     pb.ListKeysRequest(page_size=1, page_token=f"{extra_keys[0].created_at_ms}:{extra_keys[0].key_id}")],
        "RevokeKey": [pb.RevokeKeyRequest(key_id=k.key_id) for k in extra_keys[:2]],
        "GetUsage": [pb.GetUsageRequest(tenant=tn[0].tenant_id), pb.GetUsageRequest(tenant=fuzzer.tenant_id)],
    }
    seeds: dict[str, list[list[bytes]]] = {}
    for path, method in METHODS.items():  # a method without a seed here starts from its empty message
        listed = seeds_by_method.get(method.name, [request_class(method)()])
        seeds[path] = [[m.SerializeToString() for m in (s if isinstance(s, list) else [s])] for s in listed]

    task_ids = [ready_text, ready_image, add_target, train_target, *doomed, text_task, image_task]
    shapes = Shapes(
        strings_by_field={
            "task_id": task_ids, "task_ids": task_ids, "page_token": task_ids,
            "job_id": [text_job.job_id, image_job.job_id],
            "backbone": ["minilm-l6", "mobilenet_v3_small", "resnet50", "MINILM-L6"],
            "label": ["sports", "cooking", "computing", "red", "blue"],
            "labels": ["sports", "cooking", "red"],
            "text": [t for texts in TOPICS.values() for t in texts[:2]],
            "tap": ["last", "last-1", "last-2", "last-3", "last+last-1", "last+last-1+last-2+last-3"],
            "tenant": [t.tenant_id for t in tn] + [t.name for t in tn],
            "key_id": [k.key_id for k in extra_keys] + [k.key_id for _, k, _ in throwaway],
            "name": [unique_id("fz-made"), "ok-name", "-bad"],
            "scopes": ["predict", "train", "admin"],
            "request_id": ["r-1", "x" * 65],
        },
        ints_by_field={"expires_at_ms": [later, 1], "version": [1, 2], "page_size": [1, 2, 1000, 1001],
                       "top_k": [1, 2, 3, 4]},
    )
    w = World(
        address=server.address, fuzzer=fuzzer, admin=admin,
        train=open_channel(server.address, api_key=fuzzer.api_key),
        admin_channel=open_channel(server.address, api_key=admin.api_key),
        suite=open_channel(server.address, api_key=tenant.api_key),
        ready_text=ready_text, ready_image=ready_image, add_target=add_target, quota_tenant=quota_tenant,
        quota_channel=open_channel(server.address, api_key=quota_tenant.api_key),
        keep_tasks=frozenset({ready_text, ready_image}),
        modality={"minilm-l6": "text", "mobilenet_v3_small": "image"}, seeds=seeds, shapes=shapes,
        throwaway_refs=refs, created=[],
        missing_seeds=sorted({m.name for m in METHODS.values()} - set(seeds_by_method)),
    )
    yield w
    print("\nfuzzed calls by method and status:", sum(STATS.values()))
    for (name, code), n in sorted(STATS.items()):
        print(f"  {name:14} {code:20} {n}")
        for gist, m in DETAILS[(name, code.split(" ")[0])].most_common(4) if "(parse)" not in code else ():
            print(f"      {m:5} {gist}")
    # Everything this module made goes, with its tasks (unloaded from the predictor by the RPC).
    for tenant_id in [*w.created, *(t.tenant_id for t in tn), fuzzer.tenant_id, quota_tenant.tenant_id]:
        invoke(w.admin_channel, ADMIN + "DeleteTenant", pb.DeleteTenantRequest(tenant=tenant_id))
    for channel in (w.train, w.suite, w.quota_channel):
        channel.close()
    w.admin_channel.close()
    server.admin.delete_tenant(admin.tenant_id)


# --- what may be sent ---------------------------------------------------------------------------------

FINE_TUNE_MIN_EXAMPLES = 8  # the server's auto_fine_tune_min_examples default (AUTO fine-tunes text tasks)


def heavy(config: pb.TrainingConfig, modality: str, counts: dict[str, int]) -> bool:
    """Whether a job with this config would take long (and hold the suite's one training worker)."""
    if config.strategy == pb.FINE_TUNE or config.epochs > 50 or config.hidden_units > 256 \
            or config.augment_views > 2:
        return True
    if 100 < sum(counts.values()) <= FUZZER_QUOTAS.examples:  # more are refused before a job starts
        return True
    auto = config.strategy in (pb.STRATEGY_UNSPECIFIED, pb.AUTO) and not config.tap
    return modality == "text" and auto and bool(counts) and min(counts.values()) >= FINE_TUNE_MIN_EXAMPLES


class Guard:
    """Parses each request as the server will (same protobuf runtime, same process) and says whether it
    may be sent: nothing that could touch what this module does not own, nor start a long training job."""

    def __init__(self, world: World, server) -> None:
        self.world = world
        (everything, more), (listed, more_keys) = server.admin.list_tenants(1000), server.admin.list_keys("", 1000)
        assert not more and not more_keys
        refs = {v.tenant.tenant_id for v in everything} | {v.tenant.name for v in everything}
        keys = {k.key_id for k in listed}
        self.protected = (refs | keys) - world.throwaway_refs

    def allows(self, path: str, requests: Sequence[bytes]) -> bool:
        cls = request_class(METHODS[path])
        for raw in requests:
            try:
                msg = cls.FromString(raw)
            except Exception:  # noqa: BLE001 - the server will not parse it either: INVALID_ARGUMENT
                continue
            if not self._allows(path.rsplit("/", 1)[-1], msg):
                return False
        return True

    def _allows(self, name: str, msg) -> bool:
        w = self.world
        if name in ADMIN_READS:
            return True
        # DeleteTenant, SetQuotas, CreateKey, RevokeKey and any method added later that names a tenant or a
        # key: never one this module did not make.
        fields = msg.DESCRIPTOR.fields_by_name
        for ref in ("tenant", "key_id"):
            if ref in fields and getattr(msg, ref) in self.protected:
                return False
        if name == "DeleteTask":
            return msg.task_id not in w.keep_tasks
        if name == "CreateTask":
            counts: dict[str, int] = {}
            for ex in msg.examples:
                counts[ex.label] = counts.get(ex.label, 0) + 1
            return not heavy(msg.config, w.modality.get(msg.backbone, "text"), counts)
        if name == "TrainTask":
            got = invoke(w.train, HEADSERVE + "GetTask", pb.GetTaskRequest(task_id=msg.task_id), timeout=10)
            if got.code != grpc.StatusCode.OK:
                return True
            task = pb.Task.FromString(got.responses[0])
            config = msg.config if msg.HasField("config") else task.config
            return not heavy(config, w.modality.get(task.backbone, "text"), dict(task.examples_per_label))
        return True


def record(world: World, path: str, outcome: Outcome) -> None:
    """Remembers the tenants the fuzzer's CreateTenant made (deleted at the end)."""
    if path == ADMIN + "CreateTenant" and outcome.code == grpc.StatusCode.OK:
        made = pb.CreateTenantResponse.FromString(outcome.responses[0])
        with world.lock:
            world.created.append(made.tenant.tenant_id)


def send(world: World, guard: Guard, path: str, requests: list[bytes], key: str) -> None:
    method = METHODS[path]
    assume(guard.allows(path, requests))
    request = requests if method.client_streaming else requests[0]
    channel = world.channel(path, key)
    note(f"{path} ({key} key) request={show(request)}")
    outcome = invoke(channel, path, request)
    note(f"-> {outcome.code.name} {outcome.details[:200]!r} in {outcome.seconds:.2f}s")
    unparsed = outcome.code == grpc.StatusCode.INVALID_ARGUMENT and "is not a valid" in outcome.details
    STATS[(path.rsplit("/", 1)[-1], outcome.code.name + (" (parse)" if unparsed else ""))] += 1
    if not unparsed:
        DETAILS[(path.rsplit("/", 1)[-1], outcome.code.name)][_gist(outcome.details)] += 1
    record(world, path, outcome)
    check(outcome, path)


# --- the server stays healthy ------------------------------------------------------------------------

KNOWN = {"sports": TOPICS["sports"][0], "cooking": TOPICS["cooking"][0], "computing": TOPICS["computing"][0]}


@pytest.fixture(autouse=True)
def stays_healthy(server, client, text_task):
    yield
    channel = open_channel(server.address)
    try:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
    inputs = [pb.Input(text=t) for t in KNOWN.values()]
    answer = client.stub.Predict(pb.PredictRequest(task_id=text_task, inputs=inputs), timeout=60)
    assert [p.label for p in answer.predictions] == list(KNOWN)


@pytest.fixture
def guard(world, server) -> Guard:
    return Guard(world, server)


# --- the tests ---------------------------------------------------------------------------------------

PATHS = sorted(METHODS)


def test_every_method_has_a_seed_built_from_real_values(world):
    """Each RPC (from the descriptors) needs seeds naming real tasks, jobs, tenants or keys in `world`, or the
    mutated and structured tests of a new RPC only reach its "not found" answers."""
    assert not world.missing_seeds, f"add seeds for {world.missing_seeds} to seeds_by_method in world()"
# Mostly the method's own key; one call in ten with the suite tenant's key (read-only methods), one with
# the other service's key.
KEYS = st.integers(0, 9).map(lambda i: "other" if i == 7 else "suite" if i == 4 else "own")


@pytest.mark.parametrize("path", PATHS)
@fuzz(20)
@given(data=st.data())
def test_random_bytes(world, guard, path, data):
    method = METHODS[path]
    count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
    requests = [data.draw(st.one_of(st.binary(max_size=64), st.binary(max_size=2048))) for _ in range(count)]
    send(world, guard, path, requests, data.draw(KEYS))


@pytest.mark.parametrize("path", PATHS)
@fuzz(40)
@given(data=st.data())
def test_mutated_valid_messages(world, guard, path, data):
    seeds = world.seeds[path]
    donors = [m for s in world.seeds.values() for seed in s for m in seed]
    seed = data.draw(st.sampled_from(seeds))
    requests = [mutate(m, data.draw(mutation_ops()), donors) if data.draw(st.integers(0, 3)) else m
                for m in seed]  # most messages of the seed mutated, some as they are
    if METHODS[path].client_streaming and data.draw(st.booleans()):
        requests = requests + [mutate(requests[0], data.draw(mutation_ops()), donors)]
    send(world, guard, path, requests, data.draw(KEYS))


@pytest.mark.parametrize("path", PATHS)
@fuzz(40)
@given(data=st.data())
def test_structured_random_messages(world, guard, path, data):
    method = METHODS[path]
    if data.draw(st.booleans()):  # a whole random message (a stream: one to three)
        count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
        shape = world.shapes.message(method.input_type)
        requests = [data.draw(shape).SerializeToString() for _ in range(count)]
    else:  # a seed with a few fields replaced by random values
        seed = data.draw(st.sampled_from(world.seeds[path]))
        messages = [request_class(method).FromString(m) for m in seed]
        for msg in messages:
            world.shapes.perturb(msg, data)
        requests = [m.SerializeToString() for m in messages]
    assume(sum(map(len, requests)) <= MAX_REQUEST_BYTES)
    send(world, guard, path, requests, data.draw(KEYS))


@fuzz(100)
@given(image=hostile_images())
def test_mutated_images_predict_and_create_task(world, client, image_task, image):
    """A hostile image is INVALID_ARGUMENT or a prediction, never INTERNAL: on Predict (the suite's image
    task, read only) and on CreateTask (this module's tenant; the task is deleted at once)."""
    fmt, data = image
    note(f"{fmt} image={show(data)}")
    predicted = invoke(client.channel, HEADSERVE + "Predict", pb.PredictRequest(
        task_id=image_task, inputs=[pb.Input(image=data)]))
    check(predicted, f"Predict {fmt}")
    STATS[("img-Predict", predicted.code.name)] += 1
    task_id = unique_id("fz-img")
    created = invoke(world.train, HEADSERVE + "CreateTask", pb.CreateTaskRequest(
        task_id=task_id, backbone="mobilenet_v3_small", config=pb.TrainingConfig(strategy=pb.PROTOTYPE),
        examples=[pb.Example(input=pb.Input(image=data), label="red"),
                  pb.Example(input=pb.Input(image=SMALL_IMAGES[0]), label="red"),
                  pb.Example(input=pb.Input(image=SMALL_IMAGES[2]), label="blue")]))
    check(created, f"CreateTask {fmt}")
    STATS[("img-CreateTask", created.code.name)] += 1
    if created.code == grpc.StatusCode.OK or created.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        invoke(world.train, HEADSERVE + "DeleteTask", pb.DeleteTaskRequest(task_id=task_id))


RATES = st.one_of(st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 0.001, 0.5, 1.0, 1e9, 1.7976931348623157e308,
                                   float("inf"), float("nan"), -1.0, float("-inf")]), st.floats())
LIMITS = integers(-(2**63), 2**63 - 1, (1, 2, 3, 1000, 2**31))


@fuzz(25)
@given(quotas=st.builds(pb.Quotas, tasks=LIMITS, examples=LIMITS, stored_bytes=LIMITS, training_jobs=LIMITS,
                        predict_requests_per_second=RATES, predict_inputs_per_second=RATES),
       inputs=st.integers(0, 3))
def test_hostile_quotas_leave_every_call_of_the_tenant_well_answered(world, quotas, inputs):
    """Quotas are admin input that every later call of the tenant reads (token buckets, usage checks in the
    writing transaction): with any values SetQuotas accepts (or refuses), the tenant's calls are answered
    with their own status, never INTERNAL."""
    admin, channel = world.admin_channel, world.quota_channel
    set_quotas = invoke(admin, ADMIN + "SetQuotas", pb.SetQuotasRequest(
        tenant=world.quota_tenant.tenant_id, quotas=quotas))
    note(f"SetQuotas {quotas} -> {set_quotas.code.name} {set_quotas.details!r}")
    check(set_quotas, "SetQuotas")
    if set_quotas.code == grpc.StatusCode.OK:  # what is stored is a limit: 0 (none) or positive, never NaN
        stored = pb.Tenant.FromString(set_quotas.responses[0]).quotas
        assert all(getattr(stored, f.name) >= 0 for f in pb.Quotas.DESCRIPTOR.fields), stored
    task_id = unique_id("fz-q")
    text = [pb.Input(text="The striker scored.")] * inputs
    examples = [pb.Example(input=pb.Input(text="A late goal."), label="sports"),
                pb.Example(input=pb.Input(text="Fry the onions."), label="cooking")]
    calls = [
        ("Predict", pb.PredictRequest(task_id=task_id, inputs=text)),
        ("CreateTask", pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6")),
        ("AddExamples", [pb.AddExamplesRequest(task_id=task_id, examples=examples)]),
        ("PredictStream", [pb.PredictRequest(task_id=task_id, inputs=text)] * 3),
        ("GetTask", pb.GetTaskRequest(task_id=task_id)),
        ("ListTasks", pb.ListTasksRequest()),
        ("DeleteTask", pb.DeleteTaskRequest(task_id=task_id)),
    ]
    for name, request in calls:
        outcome = invoke(channel, HEADSERVE + name, request)
        STATS[("quota-" + name, outcome.code.name)] += 1
        check(outcome, name)
    ref = world.quota_tenant.tenant_id
    check(invoke(admin, ADMIN + "GetTenant", pb.GetTenantRequest(tenant=ref)), "GetTenant")
    check(invoke(admin, ADMIN + "ListTenants", b""), "ListTenants")


@pytest.mark.parametrize("field", ["predict_requests_per_second", "predict_inputs_per_second"])
def test_a_nan_rate_quota_is_refused_not_stored(world, field):
    """Found by the fuzzer: SetQuotas took NaN as a rate (NaN < 0 is false), stored it, and from then on
    every Predict of the tenant was RESOURCE_EXHAUSTED "retry in nan s", with no way to tell why. NaN is
    neither 0 (unlimited) nor positive: INVALID_ARGUMENT, and the tenant's quotas stay as they were."""
    ref = world.quota_tenant.tenant_id
    reset = pb.SetQuotasRequest(tenant=ref, quotas=pb.Quotas())
    assert invoke(world.admin_channel, ADMIN + "SetQuotas", reset).code == grpc.StatusCode.OK
    request = pb.SetQuotasRequest(tenant=ref, quotas=pb.Quotas(**{field: float("nan")}))
    outcome = invoke(world.admin_channel, ADMIN + "SetQuotas", request)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT and field in outcome.details, outcome
    predicted = invoke(world.quota_channel, HEADSERVE + "Predict", pb.PredictRequest(
        task_id="no-such-task", inputs=[pb.Input(text="hello")]))
    assert predicted.code == grpc.StatusCode.NOT_FOUND, predicted  # no quota in the way


WIDE = ["\U0001F642", "\u00e9", "\x00", "%", "\u202e"]  # UTF-8: 4, 2, 1 (a control), 1 ('%'), 3 (RTL mark)


@pytest.mark.parametrize("char", WIDE, ids=["emoji", "latin", "nul", "percent", "rtl"])
def test_status_messages_quoting_non_ascii_input_fit_the_clients_metadata_limit(world, char):
    """Found by the fuzzer: a status message was cut to 1000 characters, but gRPC sends it percent-encoded
    UTF-8, so 1000 emoji in a quoted task id made a 12 KB trailer; the client then reported
    RESOURCE_EXHAUSTED "received metadata size exceeds soft limit" instead of the real NOT_FOUND. Every
    message that quotes wide characters now fits, on every kind of call."""
    task_id = char * 5000
    by_id = task_id.encode()
    calls = {
        "GetTask": pb.GetTaskRequest(task_id=task_id),
        "DeleteTask": pb.DeleteTaskRequest(task_id=task_id),
        "Predict": pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="hello")]),
        "PredictStream": [pb.PredictRequest(task_ids=[task_id], inputs=[pb.Input(text="hello")])],
        "WatchJob": pb.WatchJobRequest(job_id=task_id),
        "ExportTask": pb.ExportTaskRequest(task_id=task_id),
        "CreateTask": pb.CreateTaskRequest(task_id="ok", backbone=task_id),
        "AddExamples": [pb.AddExamplesRequest(task_id=world.add_target, examples=[  # not a declared label
            pb.Example(input=pb.Input(text="hello"), label=char * 99 + "x")])],
    }
    for name, request in calls.items():
        outcome = invoke(world.train, HEADSERVE + name, request)
        check(outcome, name)
        assert outcome.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), name
    tenant = invoke(world.admin_channel, ADMIN + "GetTenant", pb.GetTenantRequest(tenant=task_id))
    check(tenant, "GetTenant")
    # A NUL is refused at the edge wherever it is not an input's text (PostgreSQL's text refuses it)
    expected = grpc.StatusCode.INVALID_ARGUMENT if char == "\x00" else grpc.StatusCode.NOT_FOUND
    assert tenant.code == expected and len(by_id) > 3000


def test_request_streams_that_never_end_are_released_at_their_deadline(world, server):
    """Client streams that send a message and then neither send nor half-close, more of them at once than
    the server has RPC threads: those the tenant's stream slots admit end with DEADLINE_EXCEEDED at their
    deadline, the others are refused at once with RESOURCE_EXHAUSTED, and the server serves again right after
    (no thread stays stuck reading a stream)."""
    from concurrent.futures import ThreadPoolExecutor

    streaming = sorted(p for p, m in METHODS.items() if m.client_streaming)
    release = threading.Event()

    def stalled(first: bytes):
        yield first
        release.wait(60)

    def one(i: int) -> Outcome:
        path = streaming[i % len(streaming)]
        return invoke(world.train, path, stalled(world.seeds[path][0][0]), timeout=2.0)

    try:
        with ThreadPoolExecutor(40) as pool:
            outcomes = list(pool.map(one, range(40)))
    finally:
        release.set()
    for outcome in outcomes:
        check(outcome, "stalled stream", timeout=2.0)
        # NOT_FOUND: an AddExamples seed's task that the fuzzer deleted earlier, refused at its first message.
        assert outcome.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                grpc.StatusCode.NOT_FOUND), (outcome.code, outcome.details)
    admitted = sum(o.code == grpc.StatusCode.DEADLINE_EXCEEDED for o in outcomes)
    assert 1 <= admitted <= server.slots.per_tenant, admitted
    assert all(o.code != grpc.StatusCode.NOT_FOUND or "does not exist" in o.details for o in outcomes)


def test_no_fuzzed_training_job_failed_with_an_internal_error(world):
    """Jobs the fuzzer started end in SUCCEEDED or a FAILED state that says what was wrong with the request,
    never "internal error during training"."""
    channel, deadline = world.train, time.monotonic() + 60
    while True:
        listed = invoke(channel, HEADSERVE + "ListTasks", pb.ListTasksRequest(page_size=1000))
        assert listed.code == grpc.StatusCode.OK, listed.details
        tasks = pb.ListTasksResponse.FromString(listed.responses[0]).tasks
        if all(t.state != pb.Task.TRAINING for t in tasks) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    internal = [(t.task_id, t.error) for t in tasks if "internal error" in t.error]
    assert not internal, internal
