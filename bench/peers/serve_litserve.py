"""LitServe serving the fused models: one LitAPI per model at /text and /image, LitServe's own dynamic
batching (max_batch_size, batch_timeout), one worker on the CPU, its ZeroMQ fast queue.

    python serve_litserve.py SPEC.json      (in bench/.peers-venv/litserve; started by bench/peers.py)
"""

from __future__ import annotations

import base64
import json
import pathlib
import sys

import litserve as ls

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from model import FusedModel  # noqa: E402


class FusedAPI(ls.LitAPI):
    def __init__(self, name: str, spec: dict, **kwargs) -> None:
        super().__init__(api_path=f"/{name}", **kwargs)
        self.model_spec = spec

    def setup(self, device) -> None:
        self.model = FusedModel.load(self.model_spec)

    def decode_request(self, request):
        x = request["input"]
        return x if self.model_spec["kind"] == "text" else base64.b64decode(x)

    def batch(self, inputs):
        return list(inputs)

    def predict(self, items):
        return self.model.predict(list(items))

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


def main() -> None:
    spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
    apis = [
        FusedAPI(name, m, max_batch_size=spec["max_batch_size"], batch_timeout=spec["batch_timeout_s"])
        for name, m in spec["models"].items()
    ]
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=1, fast_queue=True, timeout=120)
    server.run(host="127.0.0.1", port=spec["port"], generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
