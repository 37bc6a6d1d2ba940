"""Hostile and odd inputs (issue 13): every bad image is INVALID_ARGUMENT and leaves the server serving, a
valid photo with broken metadata is served, decoding is bounded before it allocates, and tasks past a
thousand held-out predictions train."""

from __future__ import annotations

import io
import json
import pathlib
import struct
import subprocess
import sys
import textwrap
import zlib

import grpc
import numpy as np
import pytest
from conftest import png, unique_id
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageFile

from adapters.errors import InvalidInput
from adapters.evaluation import binomial_tail, warnings_for
from adapters.preprocessing import ImagePreprocessor, ImageTransform, InputLimits, decode_image
from service.gen import headserve_pb2 as pb

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
RED, BLUE = (220, 30, 30), (30, 40, 220)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def normalised(rgb) -> np.ndarray:
    return (np.asarray(rgb, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def smooth_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photo-like image: low-frequency colour blobs, so resampling choices change little."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[1] // 40 + 2, size[0] // 40 + 2, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def raw_exif(*entries: tuple[int, int, int, bytes]) -> bytes:
    """An EXIF block as cameras write it (little-endian TIFF, one IFD), from (tag, type, count, payload)
    entries; Pillow's own writer refuses the mistyped tags that phones produce."""
    data_offset = 8 + 2 + 12 * len(entries) + 4
    ifd, extra = b"", b""
    for tag, typ, count, payload in entries:
        if len(payload) <= 4:
            ifd += struct.pack("<HHI", tag, typ, count) + payload.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, typ, count, data_offset + len(extra))
            extra += payload
    return b"Exif\0\0II*\0" + struct.pack("<IH", 8, len(entries)) + ifd + b"\0\0\0\0" + extra


ASCII, SHORT = 2, 3
ROTATE_90 = (0x0112, SHORT, 1, struct.pack("<H", 6))  # Orientation 6: turn 90 degrees clockwise to display
ODD_TAGS = {
    "xresolution-as-text": (0x011A, ASCII, 3, b"72\0"),  # TypeError in ImageOps.exif_transpose
    "resolutionunit-as-text": (0x0128, ASCII, 2, b"2\0"),  # struct.error
}


def half_and_half(size=(40, 30)) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.empty((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = RED
    arr[:, size[0] // 2:] = BLUE
    return Image.fromarray(arr)


def odd_exif_photo(tag: str) -> bytes:
    return encode(half_and_half(), "JPEG", quality=95, exif=raw_exif(ROTATE_90, ODD_TAGS[tag]))


def forged_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over next to no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b""))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


STRIP = encode(Image.new("RGB", (1, 12000)), optimize=True)  # ~100 bytes: a 256x3,072,000 resize, unbounded


# --- the no-transfer test at the advertised limit -------------------------------------------------


@pytest.mark.parametrize("n", [1_000, 1_200, 100_000])
def test_binomial_tail_matches_scipy_for_large_tasks(n):
    from scipy.stats import binom

    p = 0.34
    sd = int((n * p * (1 - p)) ** 0.5)
    for successes in (0, 1, round(n * p) - 3 * sd, round(n * p), round(n * p) + 3 * sd, n // 2, n, n + 1):
        want = float(binom.sf(successes - 1, n, p))
        assert binomial_tail(successes, n, p) == pytest.approx(want, rel=1e-8, abs=1e-300), successes


def test_binomial_tail_known_value():
    # P(X >= 600) for X ~ Binomial(1000, 1/2), the sum of exact integers C(1000, i) over 2^1000.
    assert binomial_tail(600, 1000, 0.5) == pytest.approx(1.3642320780329735e-10, rel=1e-10)


def _evaluation(val_acc: float, baseline: float, n_val: int) -> dict:
    per_label = [{"support": n_val // 2}, {"support": n_val - n_val // 2}]
    return {"train_accuracy": val_acc, "validation_accuracy": val_acc, "per_label": per_label,
            "baseline_accuracy": baseline, "strategy": "linear", "prototype_accuracy": None}


def test_no_transfer_warning_at_100000_examples():
    labels = ["a", "b"] * 50_000
    chance = warnings_for(_evaluation(0.501, 0.5, 100_000), labels, None)
    assert any(w.startswith("no transfer") for w in chance), chance
    learned = warnings_for(_evaluation(0.51, 0.5, 100_000), labels, None)  # p ~ 1e-10 over 100,000
    assert not any(w.startswith("no transfer") for w in learned), learned


def test_task_past_a_thousand_held_out_predictions_trains(client):
    """1,100 sentences whose labels are noise: every example is scored out of fold, and the job must
    succeed and say that nothing transferred (it died with OverflowError from 1,030 on)."""
    rng = np.random.default_rng(13)
    words = ["river", "ledger", "violin", "copper", "meadow", "engine", "harbour", "pepper", "glacier"]
    texts = [f"note {i}: {' '.join(rng.choice(words, 4))}" for i in range(1_100)]
    examples = [pb.Example(input=pb.Input(text=text), label=f"l{rng.integers(4)}") for text in texts]
    task_id = unique_id("large")
    config = pb.TrainingConfig(strategy=pb.PROTOTYPE, label_text=pb.LABEL_TEXT_OFF)
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="minilm-l6", examples=examples,
                                                config=config))
    try:
        job = client.wait_ready(task_id, timeout=300)
        assert job.state == pb.Job.SUCCEEDED, job.error
        assert job.evaluation.num_examples == 1_100
        assert any(w.startswith("no transfer") for w in job.evaluation.warnings), job.evaluation.warnings
    finally:
        client.stub.DeleteTask(pb.DeleteTaskRequest(task_id=task_id))


# --- EXIF: metadata never fails a photo -----------------------------------------------------------


@pytest.mark.parametrize("tag", sorted(ODD_TAGS))
def test_orientation_is_applied_when_other_exif_tags_are_mistyped(tag):
    img = decode_image(odd_exif_photo(tag), 0)
    assert img.size == (30, 40)  # turned upright: the left (red) half is now on top
    top, bottom = np.asarray(img)[5, 15], np.asarray(img)[35, 15]
    assert np.abs(top.astype(int) - RED).max() < 30 and np.abs(bottom.astype(int) - BLUE).max() < 30


@pytest.mark.parametrize("orientation", [
    pytest.param((0x0112, ASCII, 2, b"6\0"), id="orientation-as-text"),
    pytest.param((0x0112, SHORT, 1, struct.pack("<H", 9)), id="orientation-9"),
    pytest.param((0x0112, SHORT, 200, struct.pack("<I", 10**6)), id="orientation-past-the-end"),
])
def test_unreadable_orientation_keeps_the_image_as_stored(orientation):
    img = decode_image(encode(half_and_half(), "JPEG", exif=raw_exif(orientation)), 0)
    assert img.size == (40, 30)


@pytest.mark.parametrize("tag", sorted(ODD_TAGS))
def test_photos_with_mistyped_exif_are_predicted_and_learned_from(client, image_task, tag):
    photo = odd_exif_photo(tag)
    resp = client.stub.Predict(pb.PredictRequest(task_id=image_task, inputs=[pb.Input(image=photo)]))
    assert len(resp.predictions) == 1
    task_id = unique_id("exif")
    examples = [pb.Example(input=pb.Input(image=photo), label="halves"),
                pb.Example(input=pb.Input(image=png(RED, noise=20)), label="red")]
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone="mobilenet_v3_small",
                                                examples=examples))
    try:
        job = client.wait_ready(task_id)
        assert job.state == pb.Job.SUCCEEDED, job.error
    finally:
        client.stub.DeleteTask(pb.DeleteTaskRequest(task_id=task_id))


# --- any decoder failure is the caller's bad input ------------------------------------------------


DECODER_ERRORS = [struct.error("unpack requires a buffer of 4 bytes"), TypeError("bad operand"), EOFError(),
                  ZeroDivisionError(), IndexError(), KeyError(7), RecursionError(), ValueError(),
                  SyntaxError()]


def _failing_load(exc: BaseException):
    def load(self):
        raise exc

    return load


@pytest.mark.parametrize("exc", DECODER_ERRORS, ids=lambda e: type(e).__name__)
def test_any_decoder_exception_is_invalid_input(monkeypatch, exc):
    monkeypatch.setattr(ImageFile.ImageFile, "load", _failing_load(exc))
    with pytest.raises(InvalidInput) as err:
        decode_image(png(RED), 3)
    assert err.value.message.startswith(f"input 3: image bytes could not be decoded ({type(exc).__name__})")
    assert len(err.value.message) < 200


def test_out_of_memory_is_not_blamed_on_the_input(monkeypatch):
    monkeypatch.setattr(ImageFile.ImageFile, "load", _failing_load(MemoryError()))
    with pytest.raises(MemoryError):
        decode_image(png(RED), 0)


@pytest.mark.parametrize("exc", DECODER_ERRORS[:6], ids=lambda e: type(e).__name__)
def test_decoder_exceptions_are_invalid_argument_through_the_server(monkeypatch, stub, image_task, exc):
    monkeypatch.setattr(ImageFile.ImageFile, "load", _failing_load(exc))
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(pb.PredictRequest(task_id=image_task, inputs=[pb.Input(image=png(RED))]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    monkeypatch.undo()
    served = stub.Predict(pb.PredictRequest(task_id=image_task, inputs=[pb.Input(image=png(RED))]))
    assert len(served.predictions) == 1


# --- hostile images through the server --------------------------------------------------------------


HOSTILE = {
    "strip-1x12000": (STRIP, "1x12000"),
    "strip-12000x1": (encode(Image.new("RGB", (12000, 1)), optimize=True), "12000x1"),
    "header-over-the-pixel-limit": (forged_png(7000, 6000), "7000x6000"),
    "header-claims-10-gigapixels": (forged_png(100_000, 100_000), "more pixels than the limit"),
    "header-zero-width": (forged_png(0, 10), "input 1"),
    "truncated-jpeg": (encode(smooth_image((64, 48)), "JPEG")[:300], "could not be decoded"),
    "gif-header-then-noise": (b"GIF89a\x10\x00\x10\x00\xf7\x00\x00" + bytes(range(256)) * 3,
                              "could not be decoded"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_image_is_invalid_argument_and_the_server_keeps_serving(client, image_task, name):
    data, fragment = HOSTILE[name]
    stub = client.stub
    good = pb.Input(image=png(RED, noise=10))
    task_id = unique_id("hostile")
    examples = [pb.Example(input=good, label="red"), pb.Example(input=pb.Input(image=data), label="blue")]
    create = pb.CreateTaskRequest(task_id=task_id, backbone="mobilenet_v3_small", examples=examples)
    predict = pb.PredictRequest(task_id=image_task, inputs=[good, pb.Input(image=data)])
    for call in (lambda: stub.CreateTask(create), lambda: stub.Predict(predict)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "input 1" in err.value.details() and fragment in err.value.details(), err.value.details()
        assert len(err.value.details()) < 300
    with pytest.raises(grpc.RpcError) as err:
        stub.GetTask(pb.GetTaskRequest(task_id=task_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # nothing of the upload was kept
    assert len(stub.Predict(pb.PredictRequest(task_id=image_task, inputs=[good])).predictions) == 1
    health = health_pb2_grpc.HealthStub(client.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


# --- decoding is bounded before it allocates ------------------------------------------------------


def test_strip_is_refused_from_its_header_without_allocating():
    """In a fresh process (its peak RSS is its own): the 1x12000 strip used to cost 12 s and +3 GiB."""
    script = textwrap.dedent("""
        import json, resource, sys
        from adapters.errors import InvalidInput
        from adapters.preprocessing import ImagePreprocessor, ImageTransform
        pre = ImagePreprocessor(ImageTransform())
        data = sys.stdin.buffer.read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            pre([data])
            error = None
        except InvalidInput as exc:
            error = exc.message
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({"error": error, "grown_kib": grown}))
    """)
    out = subprocess.run([sys.executable, "-c", script], input=STRIP, capture_output=True, timeout=120,
                         check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
    result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert result["error"] is not None and "1x12000" in result["error"] and "50:1" in result["error"]
    assert result["grown_kib"] < 64 * 1024


def test_aspect_ratio_limit_is_a_parameter():
    pre = ImagePreprocessor(ImageTransform(image_size=8, resize=8), InputLimits(max_image_aspect_ratio=4))
    assert pre([encode(Image.new("RGB", (40, 10), RED)), encode(Image.new("RGB", (10, 40), RED))])[
        "pixel_values"].shape == (2, 3, 8, 8)
    for size in ((41, 10), (10, 41)):
        with pytest.raises(InvalidInput) as err:
            pre.check([encode(Image.new("RGB", size, RED))])
        assert f"{size[0]}x{size[1]}" in err.value.message and "4:1" in err.value.message
    with pytest.raises(ValueError):
        InputLimits(max_image_aspect_ratio=0.5)


def test_default_aspect_limit_admits_panoramas_and_receipts():
    pre = ImagePreprocessor(ImageTransform(image_size=16, resize=16))
    for size in ((50, 1), (1, 50), (12000, 1200), (300, 17)):
        assert pre([encode(Image.new("RGB", size, RED))])["pixel_values"].shape == (1, 3, 16, 16)


SMALL = ImageTransform(image_size=32, resize=40)  # decoded down to no less than 3 x 40 = 120 px


def reference(img: Image.Image, transform: ImageTransform = SMALL) -> np.ndarray:
    """The evaluation transform on the full-resolution pixels (torchvision, as in training)."""
    from torchvision.transforms import functional as F

    img = F.center_crop(F.resize(img.convert("RGB"), [transform.resize]), [transform.image_size] * 2)
    hwc = (np.asarray(img, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return hwc.transpose(2, 0, 1)


@pytest.mark.parametrize("fmt,kw,decoded", [
    ("JPEG", {"quality": 95}, (150, 120)),  # DCT scaling by 1/8 in the decoder
    ("PNG", {}, (150, 120)),  # decoded whole, then Image.reduce(8)
])
def test_large_image_is_decoded_at_reduced_scale_with_the_same_result(fmt, kw, decoded):
    img = smooth_image((1200, 960))
    data = encode(img, fmt, **kw)
    assert decode_image(data, 0, InputLimits(), SMALL.resize).size == decoded
    assert decode_image(data, 0).size == (1200, 960)  # no target: full resolution
    got = ImagePreprocessor(SMALL)([data])["pixel_values"][0]
    want = reference(Image.open(io.BytesIO(data)))
    assert np.abs(got - want).mean() < 0.05 and np.abs(got - want).max() < 0.5


def test_image_under_three_times_the_resize_is_decoded_exactly():
    data = encode(smooth_image((119, 200)))
    got = ImagePreprocessor(SMALL)([data])["pixel_values"][0]
    np.testing.assert_allclose(got, reference(Image.open(io.BytesIO(data))), atol=1e-5)


def test_large_16bit_png_is_reduced_and_scaled():
    data = encode(Image.fromarray(np.full((960, 1200), 32768, np.uint16)))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = ImagePreprocessor(SMALL)([data])["pixel_values"][0]
    tol = 1.5 / 255 / IMAGENET_STD.min()
    np.testing.assert_allclose(out[:, 16, 16], normalised((128, 128, 128)), atol=tol)


def test_large_cmyk_jpeg_is_decoded_at_reduced_scale():
    cmyk = Image.new("CMYK", (1200, 960), (0, 255, 255, 0))  # red
    data = encode(cmyk, "JPEG", quality=95)
    img = decode_image(data, 0, InputLimits(), SMALL.resize)
    assert img.mode == "RGB" and img.size == (150, 120)
    assert np.abs(np.asarray(img, int)[60, 75] - (255, 0, 0)).max() < 12


@pytest.mark.parametrize("fmt,kw", [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_animation_is_read_from_its_first_frame(fmt, kw):
    frames = [Image.new("RGB", (64, 48), RED), Image.new("RGB", (64, 48), BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = ImagePreprocessor(SMALL)([data])["pixel_values"][0]
    np.testing.assert_allclose(out[:, 16, 16], normalised(RED), atol=3 / 255 / IMAGENET_STD.min())


def test_nul_characters_in_ids_names_and_tokens_are_invalid_argument_on_both_stores(tmp_path, store_url):
    """PostgreSQL's text columns refuse NUL (psycopg's DataError was an INTERNAL error) where SQLite stores
    it: every string of a request but an input's text is refused at the edge with INVALID_ARGUMENT, on
    either store, naming the field; nothing is created, and the server keeps serving. An input's text may
    hold NUL (it is content)."""
    from conftest import TINY_TEXT, TOPICS, Client, make_settings, make_tenant, text_examples

    from service.server import build_server

    running = build_server(make_settings(tmp_path, with_minilm=False, auth="api_key", store_url=store_url))
    who = make_tenant(running)
    admin = make_tenant(running, scopes=("admin",))
    client, ops = Client(running.address, who.api_key), Client(running.address, admin.api_key)
    try:
        task_id = unique_id("nul")
        client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=TINY_TEXT, examples=text_examples()))
        assert client.wait_ready(task_id).state == pb.Job.SUCCEEDED
        tenant_name = running.admin.tenant(who.tenant_id).tenant.name
        keys_before = {k.key_id for k in running.admin.list_keys("", 1000)[0]}
        nul = "a\x00b"
        bad = [
            (client.stub.GetTask, pb.GetTaskRequest(task_id=nul), "task_id"),
            (client.stub.ListTasks, pb.ListTasksRequest(page_token=nul), "page_token"),
            (client.stub.ListTasks, pb.ListTasksRequest(backbone=nul), "backbone"),
            (client.stub.TrainTask, pb.TrainTaskRequest(task_id=task_id, config=pb.TrainingConfig(
                label_descriptions={"sports": nul})), "config.label_descriptions['sports']"),
            (client.stub.CreateTask, pb.CreateTaskRequest(task_id=unique_id("nul"), backbone=TINY_TEXT,
                                                          labels=["sports", nul]), "labels"),
            (client.stub.Predict, pb.PredictRequest(task_id=task_id, request_id=nul,
                                                    inputs=[pb.Input(text="goal")]), "request_id"),
            (ops.admin.GetTenant, pb.GetTenantRequest(tenant=nul), "tenant"),
            (ops.admin.ListTenants, pb.ListTenantsRequest(page_token=nul), "page_token"),
            (ops.admin.ListKeys, pb.ListKeysRequest(tenant=nul), "tenant"),
            (ops.admin.CreateKey, pb.CreateKeyRequest(tenant=tenant_name, scopes=["predict"], description=nul),
             "description"),
            (ops.admin.RevokeKey, pb.RevokeKeyRequest(key_id=nul), "key_id"),
        ]
        for rpc, request, field in bad:
            with pytest.raises(grpc.RpcError) as err:
                rpc(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
            assert err.value.details().startswith(f"{field} contains a NUL"), err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.stub.AddExamples(iter([pb.AddExamplesRequest(task_id=task_id, examples=[
                pb.Example(label="sports", input=pb.Input(text="one more goal")),
                pb.Example(label="cook\x00ing", input=pb.Input(text="stir the pot"))])]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("examples[1].label contains a NUL")

        task = client.stub.GetTask(pb.GetTaskRequest(task_id=task_id), timeout=10)
        assert (task.state, task.version, task.num_examples) == (pb.Task.READY, 1, len(text_examples()))
        assert [t.task_id for t in client.stub.ListTasks(pb.ListTasksRequest(), timeout=10).tasks] == [task_id]
        assert {k.key_id for k in running.admin.list_keys("", 1000)[0]} == keys_before
        # Content may hold NUL: an input's text is predicted, and stored as an example.
        answer = client.stub.Predict(pb.PredictRequest(task_id=task_id, inputs=[pb.Input(text="goal\x00!")]))
        assert answer.predictions[0].label in TOPICS
        added = client.stub.AddExamples(iter([pb.AddExamplesRequest(task_id=task_id, examples=[
            pb.Example(label="sports", input=pb.Input(text="a late\x00 goal"))])]), timeout=10)
        assert added.added == 1
    finally:
        client.close()
        ops.close()
        running.stop()
