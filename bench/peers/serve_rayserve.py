"""Ray Serve serving the fused models: one deployment per model (one replica each) behind Ray's HTTP proxy
at /text and /image, with @serve.batch (max_batch_size, batch_wait_timeout_s).

    python serve_rayserve.py SPEC.json      (in bench/.peers-venv/rayserve; started by bench/peers.py)
"""

from __future__ import annotations

import base64
import json
import pathlib
import signal
import sys
import threading

HERE = pathlib.Path(__file__).resolve().parent


def main() -> None:
    spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
    import ray
    from ray import serve
    from starlette.requests import Request

    ray.init(num_cpus=spec.get("cores", 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}})
    serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]})

    @serve.deployment(num_replicas=1, max_ongoing_requests=spec["max_ongoing_requests"],
                      ray_actor_options={"num_cpus": 0})
    class Fused:
        def __init__(self, model_spec: dict) -> None:
            from model import FusedModel

            self.model = FusedModel.load(model_spec)
            self.kind = model_spec["kind"]

        @serve.batch(max_batch_size=spec["max_batch_size"], batch_wait_timeout_s=spec["batch_timeout_s"])
        async def batched(self, items: list) -> list[dict]:
            return self.model.predict(items)

        async def __call__(self, request: Request) -> dict:
            x = (await request.json())["input"]
            return await self.batched(x if self.kind == "text" else base64.b64decode(x))

    for name, m in spec["models"].items():
        serve.run(Fused.options(name=name).bind(m), name=name, route_prefix=f"/{name}")
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
