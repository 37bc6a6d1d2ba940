"""Triton Inference Server (through nvidia-pytriton) serving the fused models: one Triton model per fused
model, Triton's dynamic batcher (max_batch_size, max_queue_delay_microseconds), inputs as BYTES over
Triton's HTTP/REST (KServe v2) endpoint at /v2/models/{text,image}/infer.

    python serve_pytriton.py SPEC.json      (in bench/.peers-venv/pytriton; started by bench/peers.py)

pytriton's Python backend stub is linked against the system's libpython3.x; where the interpreter running
this file is another build of the same minor version (pyenv's 3.11.7 over Debian's 3.11.2 here), the stub
runs the newer standard library on the older runtime and fails in multiprocessing's resource tracker with
"'_thread.RLock' object has no attribute '_recursion_count'". bench/peers.py therefore starts this file with
LD_LIBRARY_PATH set to the interpreter's own LIBDIR, so that the stub loads the matching libpython.
"""

from __future__ import annotations

import base64
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from model import FusedModel  # noqa: E402


def infer_function(model: FusedModel):
    from pytriton.decorators import batch

    @batch
    def infer(input):  # noqa: A002 - the tensor's name
        items = [row[0] for row in input]
        if model.kind == "text":
            items = [x.decode("utf-8") for x in items]
        else:  # images travel as base64 text: KServe v2 JSON carries BYTES as strings
            items = [base64.b64decode(x) for x in items]
        probs = model.run(model.feeds(items))
        best = probs.argmax(axis=1)
        return {
            "label": np.asarray([[model.labels[i].encode()] for i in best], dtype=np.object_),
            "score": probs[np.arange(len(best)), best].reshape(-1, 1).astype(np.float32),
        }

    return infer


def main() -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
    port = spec["port"]
    config = TritonConfig(http_address="127.0.0.1", http_port=port, grpc_address="127.0.0.1", grpc_port=port + 1,
                          metrics_port=port + 2, log_verbose=0)
    with Triton(config=config) as triton:
        for name, m in spec["models"].items():
            triton.bind(
                model_name=name,
                infer_func=infer_function(FusedModel.load(m)),
                inputs=[Tensor(name="input", dtype=bytes, shape=(1,))],
                outputs=[Tensor(name="label", dtype=bytes, shape=(1,)), Tensor(name="score", dtype=np.float32, shape=(1,))],
                config=ModelConfig(
                    max_batch_size=spec["max_batch_size"],
                    batcher=DynamicBatcher(max_queue_delay_microseconds=int(spec["batch_timeout_s"] * 1e6)),
                ),
                strict=False,
            )
        print("ready", flush=True)
        triton.serve()


if __name__ == "__main__":
    main()
