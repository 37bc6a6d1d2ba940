"""The one settings object, read once at start-up from flags, env (HEADSERVE_*) and a TOML file."""

from __future__ import annotations

import difflib
import os
import pathlib
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_BACKBONES = (
    "minilm-l6",
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "vit_b_16",
)


class CustomBackbone(BaseModel):
    """A backbone declared in the TOML file: a torchvision architecture with local weights, or a BERT-style
    text encoder saved in a local folder (mean pooling + L2 normalisation, as all-MiniLM-L6-v2)."""

    arch: str = Field(description="torchvision architecture name, e.g. 'mobilenet_v2'; for a text encoder "
                      "folder, its config.json model_type ('bert')")
    weights: pathlib.Path = Field(description=".safetensors or .pth state dict (loaded without pickle execution), "
                                  "or a folder with a text encoder's config.json, weights and tokenizer files (the "
                                  "image fields below do not apply to it)")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    image_size: int = Field(224, ge=16, le=1024)
    resize: int = Field(256, ge=16, le=2048)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"


class Settings(BaseSettings):
    """Every knob of the server. Flags beat env, env beats the TOML file, the file beats defaults."""

    model_config = SettingsConfigDict(env_prefix="HEADSERVE_", extra="forbid", validate_default=True)

    address: str = Field("127.0.0.1:50051", description="HOST:PORT to listen on; port 0 picks a free one")
    data_dir: pathlib.Path = Field(pathlib.Path("./var"), description="SQLite store and trunk ONNX cache")
    store_url: str = Field(
        "", description="the store: '' for SQLite in data_dir (one server); postgresql+psycopg://USER:PASSWORD@"
        "HOST/DB for several replicas on one PostgreSQL (run `headserve db upgrade` first)",
    )
    builtin_backbones: list[str] = Field(
        list(DEFAULT_BACKBONES), description="built-in backbones to load at start-up"
    )
    backbones: dict[str, CustomBackbone] = Field(
        default_factory=dict, description="extra backbones with local weights: [backbones.NAME] tables"
    )
    random_weights: list[str] = Field(
        default_factory=list,
        description="backbones allowed to run on random weights when none are installed (tests only)",
    )
    weights_dir: pathlib.Path | None = Field(
        None, description="TORCH_HOME for torchvision weights; default: torch.hub's default"
    )
    allow_download: bool = Field(False, description="let torchvision download missing weights at start-up")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where trunks and training run")

    max_message_bytes: int = Field(64 << 20, ge=1 << 16, description="largest gRPC message accepted")
    max_inputs_per_request: int = Field(256, ge=1, description="inputs in one Predict request")
    max_upload_bytes: int = Field(
        256 << 20, ge=1 << 16, description="bytes of one AddExamples stream, which is stored all or nothing and "
        "so held in memory until it ends; larger uploads are split over several streams",
    )
    max_examples_per_task: int = Field(
        20_000, ge=2, description="examples one task may hold; 20,000 was measured to train (AUTO, minilm-l6) in "
        "about 6 minutes and 1.9 GB on a 2-core CPU (docs/benchmarks.md, Limits); time grows linearly past it",
    )
    max_labels_per_task: int = Field(1000, ge=2)
    max_label_length: int = Field(100, ge=1, le=10_000, description="characters")
    max_text_length: int = Field(20_000, ge=1, description="characters in one text input")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decoded width*height of one image")
    max_image_aspect_ratio: float = Field(
        50.0, ge=1, le=10_000, description="long side over short side of one image, checked from its header "
        "before decoding (receipts and panoramas stay under 30; a 1x12000 strip would cost gigabytes to resize)",
    )

    grpc_workers: int = Field(32, ge=1, description="threads serving RPCs")
    switch_interval_ms: float = Field(
        0.5, gt=0, le=100, description="the interpreter's thread switch interval in the server's process "
        "(sys.setswitchinterval; Python's default is 5): how long a thread back from C code (onnxruntime, the "
        "tokenizer, an image decoder) may wait for the GIL while another thread runs Python. Lower keeps "
        "Predict's tail short beside calls that run much Python (a page of 500 tasks)",
    )
    stream_slots: int = Field(
        0, ge=0, description="streams open at once (AddExamples, WatchJob, ExportTask, PredictStream, "
        "reflection), each holding one of grpc_workers' threads while open; more are refused with "
        "RESOURCE_EXHAUSTED; 0: half of grpc_workers")
    stream_slots_per_tenant: int = Field(
        0, ge=0, description="of those, the most one tenant may hold; 0: a quarter of grpc_workers with "
        "auth = api_key, all of stream_slots without auth (one tenant)")

    # Security: who may call, over what transport (README "Security").
    auth: Literal["none", "api_key"] = Field(
        "none", description="none: every caller is the 'default' tenant with every scope (loopback only, "
        "unless allow_insecure); api_key: `authorization: Bearer <key>` metadata on every call but Health",
    )
    allow_insecure: bool = Field(
        False, description="serve with auth = 'none' on an address other than loopback (logged at every start)"
    )
    auth_cache_seconds: float = Field(
        2.0, ge=0, le=10, description="how long a verified key is trusted before the store is asked again "
        "(revocation on this server is immediate; on other replicas, within this time)",
    )
    auth_stale_seconds: float = Field(
        300.0, ge=0, le=86_400, description="while the store does not answer (a database restart), a key "
        "verified within this many seconds keeps being accepted, with its tenant's quotas as last read, so "
        "that loaded heads keep serving; 0: every call whose key is past auth_cache_seconds is UNAVAILABLE "
        "until the store answers",
    )
    tls_cert_file: pathlib.Path | None = Field(None, description="PEM certificate chain; with tls_key_file: TLS on")
    tls_key_file: pathlib.Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: pathlib.Path | None = Field(
        None, description="PEM CA bundle that client certificates must chain to (mTLS)"
    )
    tls_client_auth: Literal["none", "optional", "require"] = Field(
        "none", description="client certificates: not asked for, or required (mTLS). \"optional\" is refused at "
        "start: grpc python cannot ask for a certificate without requiring it",
    )

    # Serving: dynamic batching per backbone (across tasks) and the LRU of loaded heads.
    batch_max_size: int = Field(
        32, ge=1, le=4096,
        description="inputs in one trunk pass; requests are never split, so one larger request runs alone",
    )
    batch_max_delay_us: int = Field(
        0, ge=0, le=1_000_000,
        description="longest a forming batch waits for rows known or expected to arrive (requests being "
        "prepared; under steady load, the callers the last batch answered); 0: take what is queued. An idle "
        "server never waits. 0 is best for text on a CPU, where a larger batch pads more and costs as much "
        "per input (docs/design.md, 'Serving: the batcher'); on a GPU, where a larger batch is nearly free, "
        "try 1000-5000",
    )
    batch_adaptive: bool = Field(
        True, description="limit batches to the size (a power of two up to batch_max_size) with the lowest "
        "measured time per input, re-measured as the load changes; off: always up to batch_max_size",
    )
    batch_fair_lane: bool = Field(
        True, description="a tenant with nothing in the running batch gets a second batch beside it at once, "
        "instead of waiting for it to finish (one tenant alone batches the same either way)",
    )
    batch_queue_inputs: int = Field(
        2048, ge=1,
        description="inputs waiting for a trunk pass per backbone; beyond, Predict is RESOURCE_EXHAUSTED",
    )
    head_cache_mb: int = Field(
        512, ge=1, le=1 << 20,
        description="memory budget of the loaded heads (least recently used are unloaded beyond it)",
    )
    max_tasks_per_request: int = Field(64, ge=1, le=4096, description="tasks in one multi-task Predict")
    trunk_spinning: bool = Field(
        False, description="let the trunk's onnxruntime threads busy-wait between operators while a trunk pass "
        "runs (they stop when it ends): faster lone requests, but under load they hold the cores that this "
        "replica's training worker and other processes on the machine would use; for replicas that only "
        "serve (training_workers = 0)",
    )
    trunk_cuts: bool = Field(
        True, description="run a batch whose heads read only early trunk outputs (tuned heads read the "
        "embedding output) through a session of the trunk cut after them, made at the first such batch; each "
        "holds its own copy of the weights it reads (48 MB for minilm-l6's embeddings)",
    )
    tensorrt: bool = Field(
        False, description="on a GPU, run trunks with TensorRT before CUDA (engines built on first use and "
        "cached in trunk_cache_dir/tensorrt)",
    )
    cuda_graphs: bool = Field(
        True, description="on a GPU, replay image trunks as CUDA graphs, one per batch size up to 32 (a batch "
        "is padded up to the next power of two), each checked against a plain run when captured; off: every "
        "batch launches the trunk's kernels one by one",
    )
    precision: dict[str, Literal["fp32", "tf32", "int8"]] = Field(
        default_factory=dict, description="trunk precision per backbone, e.g. [precision] minilm-l6 = \"int8\" "
        "(env: HEADSERVE_PRECISION='{\"minilm-l6\": \"int8\"}'); unnamed backbones run fp32. int8 is onnxruntime "
        "dynamic quantisation, for CPUs; tf32 is the CUDA provider's TF32 matrix products, for GPUs "
        "(refused on a CPU; features at a cosine of 0.99997 to fp32). A head is served at the precision it "
        "was trained at: after a change, its Predict is FAILED_PRECONDITION until the task is trained again",
    )
    trunk_cache_dir: pathlib.Path | None = Field(
        None, description="folder of exported trunk ONNX files and backbone facts, shared by every server and data "
        "directory that names it (keyed by weights, exporter versions and precision); default "
        "~/.cache/headserve/trunks",
    )
    training_workers: int = Field(
        1, ge=0, le=64, description="training workers of this replica, each training one job at a time; 0: "
        "this replica trains nothing (a `headserve worker` replica does)",
    )
    training_isolation: Literal["process", "thread"] = Field(
        "process", description="where training workers run: 'process' (worker processes, so training never "
        "holds the serving process's GIL) or 'thread' (inside the server: less memory, for small machines)",
    )
    job_lease_seconds: float = Field(
        30.0, ge=2, le=3600, description="a worker renews its claim on a job this often x3; a job whose worker "
        "stopped renewing is taken over by another worker once its lease runs out",
    )
    job_max_attempts: int = Field(
        3, ge=1, le=100, description="a job whose worker died this many times is failed, not claimed again",
    )
    max_connection_age_seconds: float = Field(
        300.0, ge=0, le=86400, description="after about this long, a client connection takes no new calls (GOAWAY; "
        "calls and streams in flight run to their end), so that clients balancing over replicas re-resolve and "
        "find new ones; 0: never",
    )
    sync_interval_seconds: float = Field(
        0.5, gt=0, le=60, description="how often a replica reads the store's change feed for new versions, "
        "deletes and revoked keys (PostgreSQL also notifies at once; this is its fallback)",
    )
    head_versions_kept: int = Field(
        3, ge=0, le=1000, description="head versions kept per task: publishing a version deletes those older "
        "than the last this many (the live one included), in the same transaction; ExportTask of a deleted "
        "version is NOT_FOUND. A tuned text head is about 43 MB, and heads count against a tenant's "
        "stored_bytes quota; 0: keep every version")
    auto_fine_tune_min_examples: int = Field(
        8, ge=0, description="AUTO also fine-tunes text tasks whose every label has at least this many "
        "examples, and keeps the tuned head unless the feature head is clearly better on a holdout (4-35 s "
        "on a quiet 2-core CPU, seconds on a GPU; a head of about 43 MB for MiniLM; image tasks: not while the "
        "image policy for FINE_TUNE is 'never'); 0: never",
    )
    auto_fine_tune_max_examples: int = Field(
        256, ge=0, description="... and at most this many examples in all: tuning time grows with the "
        "examples (news-length text on a 2-core CPU: 128 examples 3.4 min, a training worker busy all along; "
        "seconds on a GPU, where a larger limit fits), so a larger task keeps AUTO's feature heads, and its "
        "evaluation says so (`fine_tune_skipped`); FINE_TUNE tunes on every example; 0: any number",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="onnxruntime/torch threads (a trunk pass; a heavy head, at most 4); 0 = all cores",
    )
    metrics_address: str = Field(
        "", description="HOST:PORT for Prometheus metrics at http://HOST:PORT/metrics; empty: off"
    )
    otel_endpoint: str = Field(
        "", description="OTLP/gRPC endpoint that OpenTelemetry traces go to, e.g. http://collector:4317 (needs "
        "pip install 'headserve[otel]'); empty: no tracing",
    )
    otel_sample_ratio: float = Field(
        0.1, ge=0, le=1, description="share of new traces kept when OTEL_TRACES_SAMPLER is not set (tracing "
        "every request costs about 13% of Predict p50 on a CPU; 10% costs nothing measurable)",
    )
    usage_flush_seconds: float = Field(
        10.0, gt=0, le=3600, description="how often Predict usage per task is added to the store"
    )
    health_interval_seconds: float = Field(
        5.0, gt=0, le=300, description="how often the store and failing trunks are checked for gRPC health"
    )
    export_chunk_bytes: int = Field(1 << 20, ge=1024, le=4 << 20)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per line (time, level, logger, message, request_id, tenant, "
        "task, job, exc_info)",
    )

    @field_validator("address")
    @classmethod
    def _check_address(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"address must be HOST:PORT, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both for TLS, or neither")
        if self.tls_client_auth != "none" and self.tls_client_ca_file is None:
            raise ValueError(f"tls_client_auth = {self.tls_client_auth!r} needs tls_client_ca_file")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs TLS: set tls_cert_file and tls_key_file")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @classmethod
    def check_environment(cls, environ) -> None:
        """Refuses HEADSERVE_* variables that name no setting: a misspelt HEADSERVE_TLS_CERT_FILE would
        otherwise start a plaintext server without a word. Allowed besides the settings: the clients'
        HEADSERVE_API_KEY, the test suite's HEADSERVE_FUZZ*, and the variables Kubernetes makes for a
        Service named headserve (HEADSERVE_SERVICE_*, HEADSERVE_PORT*)."""
        unknown = sorted(
            name for name in environ
            if name.startswith("HEADSERVE_") and name[len("HEADSERVE_"):].lower() not in cls.model_fields
            and name != "HEADSERVE_API_KEY" and not name.startswith(("HEADSERVE_FUZZ", "HEADSERVE_SERVICE_"))
            and not (name == "HEADSERVE_PORT" or name.startswith("HEADSERVE_PORT_"))
        )
        if unknown:
            close = difflib.get_close_matches(unknown[0][len("HEADSERVE_"):].lower(), list(cls.model_fields), 1)
            hint = f" (did you mean HEADSERVE_{close[0].upper()}?)" if close else ""
            raise ValueError(f"environment variable {unknown[0]} names no setting{hint}; "
                             "the settings are listed in README's Configuration")

    @classmethod
    def load(cls, config_file: pathlib.Path | str | None = None, **overrides: Any) -> Settings:
        """Reads settings; `overrides` (e.g. from CLI flags) win over env and the TOML file.

        Keys of `overrides` whose value is None are ignored, so flags left unset do not mask env or file.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        cls.check_environment(os.environ)
        if config_file is None:
            return cls(**given)
        path = pathlib.Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")

        class _FromFile(cls):  # type: ignore[valid-type, misc]
            model_config = SettingsConfigDict(**{**cls.model_config, "toml_file": path})

        return cls.model_validate(_FromFile(**given).model_dump())
