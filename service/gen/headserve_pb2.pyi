from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    TEXT: _ClassVar[Modality]
    IMAGE: _ClassVar[Modality]

class Strategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STRATEGY_UNSPECIFIED: _ClassVar[Strategy]
    AUTO: _ClassVar[Strategy]
    LINEAR: _ClassVar[Strategy]
    MLP: _ClassVar[Strategy]
    PROTOTYPE: _ClassVar[Strategy]
    FINE_TUNE: _ClassVar[Strategy]

class LabelText(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_TEXT_UNSPECIFIED: _ClassVar[LabelText]
    LABEL_TEXT_AUTO: _ClassVar[LabelText]
    LABEL_TEXT_ON: _ClassVar[LabelText]
    LABEL_TEXT_OFF: _ClassVar[LabelText]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    HEAD_ONNX: _ClassVar[ExportFormat]
    FUSED_ONNX: _ClassVar[ExportFormat]
MODALITY_UNSPECIFIED: Modality
TEXT: Modality
IMAGE: Modality
STRATEGY_UNSPECIFIED: Strategy
AUTO: Strategy
LINEAR: Strategy
MLP: Strategy
PROTOTYPE: Strategy
FINE_TUNE: Strategy
LABEL_TEXT_UNSPECIFIED: LabelText
LABEL_TEXT_AUTO: LabelText
LABEL_TEXT_ON: LabelText
LABEL_TEXT_OFF: LabelText
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
HEAD_ONNX: ExportFormat
FUSED_ONNX: ExportFormat

class Input(_message.Message):
    __slots__ = ("image", "text")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    text: str
    def __init__(self, image: _Optional[bytes] = ..., text: _Optional[str] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("input", "label")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    input: Input
    label: str
    def __init__(self, input: _Optional[_Union[Input, _Mapping]] = ..., label: _Optional[str] = ...) -> None: ...

class Backbone(_message.Message):
    __slots__ = ("name", "modality", "feature_dim", "weights_source", "available", "unavailable_reason", "preprocessing_json", "architecture", "device", "taps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SOURCE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_JSON_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TAPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    modality: Modality
    feature_dim: int
    weights_source: str
    available: bool
    unavailable_reason: str
    preprocessing_json: str
    architecture: str
    device: str
    taps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., feature_dim: _Optional[int] = ..., weights_source: _Optional[str] = ..., available: _Optional[bool] = ..., unavailable_reason: _Optional[str] = ..., preprocessing_json: _Optional[str] = ..., architecture: _Optional[str] = ..., device: _Optional[str] = ..., taps: _Optional[_Iterable[str]] = ...) -> None: ...

class ListBackbonesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBackbonesResponse(_message.Message):
    __slots__ = ("backbones",)
    BACKBONES_FIELD_NUMBER: _ClassVar[int]
    backbones: _containers.RepeatedCompositeFieldContainer[Backbone]
    def __init__(self, backbones: _Optional[_Iterable[_Union[Backbone, _Mapping]]] = ...) -> None: ...

class TrainingConfig(_message.Message):
    __slots__ = ("strategy", "epochs", "learning_rate", "l2", "seed", "validation_fraction", "hidden_units", "unfreeze_blocks", "tap", "augment_views", "reject_threshold", "label_text", "label_descriptions")
    class LabelDescriptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_UNITS_FIELD_NUMBER: _ClassVar[int]
    UNFREEZE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TAP_FIELD_NUMBER: _ClassVar[int]
    AUGMENT_VIEWS_FIELD_NUMBER: _ClassVar[int]
    REJECT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    LABEL_TEXT_FIELD_NUMBER: _ClassVar[int]
    LABEL_DESCRIPTIONS_FIELD_NUMBER: _ClassVar[int]
    strategy: Strategy
    epochs: int
    learning_rate: float
    l2: float
    seed: int
    validation_fraction: float
    hidden_units: int
    unfreeze_blocks: int
    tap: str
    augment_views: int
    reject_threshold: float
    label_text: LabelText
    label_descriptions: _containers.ScalarMap[str, str]
    def __init__(self, strategy: _Optional[_Union[Strategy, str]] = ..., epochs: _Optional[int] = ..., learning_rate: _Optional[float] = ..., l2: _Optional[float] = ..., seed: _Optional[int] = ..., validation_fraction: _Optional[float] = ..., hidden_units: _Optional[int] = ..., unfreeze_blocks: _Optional[int] = ..., tap: _Optional[str] = ..., augment_views: _Optional[int] = ..., reject_threshold: _Optional[float] = ..., label_text: _Optional[_Union[LabelText, str]] = ..., label_descriptions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("strategy", "train_accuracy", "validation_accuracy", "validation_method", "examples_per_label", "num_examples", "warnings", "train_seconds", "details_json", "macro_f1", "per_label", "confusion_matrix", "expected_calibration_error", "temperature", "tap", "head_bytes", "baseline_accuracy")
    class ExamplesPerLabelEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_METHOD_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_LABEL_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    MACRO_F1_FIELD_NUMBER: _ClassVar[int]
    PER_LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_MATRIX_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_CALIBRATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TAP_FIELD_NUMBER: _ClassVar[int]
    HEAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASELINE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    train_accuracy: float
    validation_accuracy: float
    validation_method: str
    examples_per_label: _containers.ScalarMap[str, int]
    num_examples: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    train_seconds: float
    details_json: str
    macro_f1: float
    per_label: _containers.RepeatedCompositeFieldContainer[LabelMetrics]
    confusion_matrix: _containers.RepeatedScalarFieldContainer[int]
    expected_calibration_error: float
    temperature: float
    tap: str
    head_bytes: int
    baseline_accuracy: float
    def __init__(self, strategy: _Optional[str] = ..., train_accuracy: _Optional[float] = ..., validation_accuracy: _Optional[float] = ..., validation_method: _Optional[str] = ..., examples_per_label: _Optional[_Mapping[str, int]] = ..., num_examples: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., train_seconds: _Optional[float] = ..., details_json: _Optional[str] = ..., macro_f1: _Optional[float] = ..., per_label: _Optional[_Iterable[_Union[LabelMetrics, _Mapping]]] = ..., confusion_matrix: _Optional[_Iterable[int]] = ..., expected_calibration_error: _Optional[float] = ..., temperature: _Optional[float] = ..., tap: _Optional[str] = ..., head_bytes: _Optional[int] = ..., baseline_accuracy: _Optional[float] = ...) -> None: ...

class LabelMetrics(_message.Message):
    __slots__ = ("label", "precision", "recall", "f1", "support")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    label: str
    precision: float
    recall: float
    f1: float
    support: int
    def __init__(self, label: _Optional[str] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ..., support: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "backbone", "labels", "state", "version", "evaluation", "error", "job_id", "num_examples", "examples_per_label", "created_at_ms", "updated_at_ms", "config")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Task.State]
        PENDING: _ClassVar[Task.State]
        TRAINING: _ClassVar[Task.State]
        READY: _ClassVar[Task.State]
        FAILED: _ClassVar[Task.State]
    STATE_UNSPECIFIED: Task.State
    PENDING: Task.State
    TRAINING: Task.State
    READY: Task.State
    FAILED: Task.State
    class ExamplesPerLabelEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_LABEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    backbone: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    state: Task.State
    version: int
    evaluation: Evaluation
    error: str
    job_id: str
    num_examples: int
    examples_per_label: _containers.ScalarMap[str, int]
    created_at_ms: int
    updated_at_ms: int
    config: TrainingConfig
    def __init__(self, task_id: _Optional[str] = ..., backbone: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[Task.State, str]] = ..., version: _Optional[int] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., error: _Optional[str] = ..., job_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., examples_per_label: _Optional[_Mapping[str, int]] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., config: _Optional[_Union[TrainingConfig, _Mapping]] = ...) -> None: ...

class CreateTaskRequest(_message.Message):
    __slots__ = ("task_id", "backbone", "examples", "config", "labels")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    backbone: str
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    config: TrainingConfig
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[str] = ..., backbone: _Optional[str] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., config: _Optional[_Union[TrainingConfig, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class AddExamplesRequest(_message.Message):
    __slots__ = ("task_id", "examples")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    def __init__(self, task_id: _Optional[str] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ...) -> None: ...

class AddExamplesResponse(_message.Message):
    __slots__ = ("task_id", "added", "duplicates", "num_examples", "examples_per_label")
    class ExamplesPerLabelEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_PER_LABEL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    added: int
    duplicates: int
    num_examples: int
    examples_per_label: _containers.ScalarMap[str, int]
    def __init__(self, task_id: _Optional[str] = ..., added: _Optional[int] = ..., duplicates: _Optional[int] = ..., num_examples: _Optional[int] = ..., examples_per_label: _Optional[_Mapping[str, int]] = ...) -> None: ...

class TrainTaskRequest(_message.Message):
    __slots__ = ("task_id", "config")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    config: TrainingConfig
    def __init__(self, task_id: _Optional[str] = ..., config: _Optional[_Union[TrainingConfig, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "task_id", "state", "phase", "progress", "epoch", "epochs", "loss", "validation_accuracy", "error", "version", "message", "evaluation")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Job.State]
        QUEUED: _ClassVar[Job.State]
        RUNNING: _ClassVar[Job.State]
        SUCCEEDED: _ClassVar[Job.State]
        FAILED: _ClassVar[Job.State]
    STATE_UNSPECIFIED: Job.State
    QUEUED: Job.State
    RUNNING: Job.State
    SUCCEEDED: Job.State
    FAILED: Job.State
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    task_id: str
    state: Job.State
    phase: str
    progress: float
    epoch: int
    epochs: int
    loss: float
    validation_accuracy: float
    error: str
    version: int
    message: str
    evaluation: Evaluation
    def __init__(self, job_id: _Optional[str] = ..., task_id: _Optional[str] = ..., state: _Optional[_Union[Job.State, str]] = ..., phase: _Optional[str] = ..., progress: _Optional[float] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., loss: _Optional[float] = ..., validation_accuracy: _Optional[float] = ..., error: _Optional[str] = ..., version: _Optional[int] = ..., message: _Optional[str] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "task_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    task_id: str
    def __init__(self, job_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "backbone")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    backbone: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., backbone: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class DeleteTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("task_id", "inputs", "top_k", "request_id", "task_ids")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    top_k: int
    request_id: str
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., task_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "score", "top", "rejected")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    top: _containers.RepeatedCompositeFieldContainer[LabelScore]
    rejected: bool
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., top: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., rejected: _Optional[bool] = ...) -> None: ...

class TaskPredictions(_message.Message):
    __slots__ = ("task_id", "version", "predictions")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    version: int
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, task_id: _Optional[str] = ..., version: _Optional[int] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "version", "request_id", "task_id", "results")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    version: int
    request_id: str
    task_id: str
    results: _containers.RepeatedCompositeFieldContainer[TaskPredictions]
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ..., task_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[TaskPredictions, _Mapping]]] = ...) -> None: ...

class ExportTaskRequest(_message.Message):
    __slots__ = ("task_id", "format", "version")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    format: ExportFormat
    version: int
    def __init__(self, task_id: _Optional[str] = ..., format: _Optional[_Union[ExportFormat, str]] = ..., version: _Optional[int] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data", "offset", "total_size", "metadata_json", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_size: int
    metadata_json: str
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., metadata_json: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class Quotas(_message.Message):
    __slots__ = ("tasks", "examples", "stored_bytes", "training_jobs", "predict_requests_per_second", "predict_inputs_per_second")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JOBS_FIELD_NUMBER: _ClassVar[int]
    PREDICT_REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PREDICT_INPUTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    tasks: int
    examples: int
    stored_bytes: int
    training_jobs: int
    predict_requests_per_second: float
    predict_inputs_per_second: float
    def __init__(self, tasks: _Optional[int] = ..., examples: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., training_jobs: _Optional[int] = ..., predict_requests_per_second: _Optional[float] = ..., predict_inputs_per_second: _Optional[float] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("tasks", "examples", "stored_bytes", "training_jobs")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JOBS_FIELD_NUMBER: _ClassVar[int]
    tasks: int
    examples: int
    stored_bytes: int
    training_jobs: int
    def __init__(self, tasks: _Optional[int] = ..., examples: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., training_jobs: _Optional[int] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("tenant_id", "name", "quotas", "usage", "created_at_ms")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    name: str
    quotas: Quotas
    usage: Usage
    created_at_ms: int
    def __init__(self, tenant_id: _Optional[str] = ..., name: _Optional[str] = ..., quotas: _Optional[_Union[Quotas, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., created_at_ms: _Optional[int] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("key_id", "tenant_id", "scopes", "description", "created_at_ms", "expires_at_ms", "revoked_at_ms")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    tenant_id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    description: str
    created_at_ms: int
    expires_at_ms: int
    revoked_at_ms: int
    def __init__(self, key_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., revoked_at_ms: _Optional[int] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("name", "scopes", "expires_at_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    expires_at_ms: int
    def __init__(self, name: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class CreateTenantResponse(_message.Message):
    __slots__ = ("tenant", "key", "api_key")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    key: ApiKey
    api_key: str
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ..., key: _Optional[_Union[ApiKey, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants", "next_page_token")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    next_page_token: str
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class DeleteTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ("tasks_deleted",)
    TASKS_DELETED_FIELD_NUMBER: _ClassVar[int]
    tasks_deleted: int
    def __init__(self, tasks_deleted: _Optional[int] = ...) -> None: ...

class SetQuotasRequest(_message.Message):
    __slots__ = ("tenant", "quotas")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    quotas: Quotas
    def __init__(self, tenant: _Optional[str] = ..., quotas: _Optional[_Union[Quotas, _Mapping]] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("tenant", "scopes", "description", "expires_at_ms")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    description: str
    expires_at_ms: int
    def __init__(self, tenant: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key", "api_key")
    KEY_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    api_key: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("tenant", "page_size", "page_token")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page_size: int
    page_token: str
    def __init__(self, tenant: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class TaskUsage(_message.Message):
    __slots__ = ("task_id", "requests", "inputs", "last_used_ms")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_MS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    requests: int
    inputs: int
    last_used_ms: int
    def __init__(self, task_id: _Optional[str] = ..., requests: _Optional[int] = ..., inputs: _Optional[int] = ..., last_used_ms: _Optional[int] = ...) -> None: ...

class UsageReport(_message.Message):
    __slots__ = ("tenant", "tasks", "requests", "inputs")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    tasks: _containers.RepeatedCompositeFieldContainer[TaskUsage]
    requests: int
    inputs: int
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ..., tasks: _Optional[_Iterable[_Union[TaskUsage, _Mapping]]] = ..., requests: _Optional[int] = ..., inputs: _Optional[int] = ...) -> None: ...
