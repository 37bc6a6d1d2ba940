"""The model every peer server runs: a fused ONNX model headserve exported (trunk + head, ExportTask
FUSED_ONNX), with the preprocessing its metadata spells out ("headserve.preprocessing"), done here without
headserve: `tokenizers` with the backbone's tokenizer.json for text, Pillow + numpy for images.

Imported by the peer servers in their own virtualenvs (bench/.peers-venv/*), so it needs only onnxruntime,
numpy, Pillow and tokenizers: no torch, no headserve.

    model = FusedModel.load(spec)       # spec: {"onnx": PATH, "kind": "text"|"image", "tokenizer": PATH}
    model.predict(["a sentence", ...])  # -> [{"label": ..., "score": ...}, ...]
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnxruntime as ort
from PIL import Image

OUTPUT = "probabilities"
DECODE_MARGIN = 3  # as headserve: a large JPEG is decoded at reduced scale down to 3x the resize side


class FusedModel:
    def __init__(self, session: ort.InferenceSession, kind: str, labels: list[str], pre: dict, tokenizer=None):
        self.session = session
        self.kind = kind
        self.labels = labels
        self.pre = pre
        self.tokenizer = tokenizer
        self.inputs = [i.name for i in session.get_inputs()]
        if kind == "image":
            self.mean = np.asarray(pre["mean"], np.float32).reshape(3, 1, 1) * 255.0
            self.scale = (1.0 / (255.0 * np.asarray(pre["std"], np.float32))).reshape(3, 1, 1)

    @classmethod
    def load(cls, spec: dict) -> FusedModel:
        # The session headserve's trunk runs with (adapters/onnx_utils.create_session): every graph optimisation,
        # one intra-op thread per core this process may use, sequential, and no busy-waiting between operators.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(os.environ.get("PEER_ORT_THREADS", "0")) or len(os.sched_getaffinity(0))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(spec["onnx"], options, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        pre = json.loads(meta["headserve.preprocessing"])
        labels = json.loads(meta["labels"])
        tokenizer = None
        if spec["kind"] == "text":
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(spec["tokenizer"])
            tokenizer.enable_truncation(max_length=int(pre.get("max_length", 256)))
            tokenizer.enable_padding()  # to the longest in the batch, as headserve
        return cls(session, spec["kind"], labels, pre, tokenizer)

    # --- preprocessing ------------------------------------------------------------------------------

    def text_feeds(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer.encode_batch(texts)
        return {
            "input_ids": np.asarray([e.ids for e in enc], np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in enc], np.int64),
        }

    def image_array(self, data: bytes) -> np.ndarray:
        p = self.pre
        img = Image.open(io.BytesIO(data))
        margin = DECODE_MARGIN * p["resize"]
        img.draft(None, (margin, margin))
        img = img.convert("RGB")
        factor = min(img.size) // margin
        if factor >= 2:
            img = img.reduce(factor)
        w, h = img.size
        short, size = min(w, h), p["resize"]
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        img = img.resize(new, Image.Resampling.BILINEAR)
        crop = p["image_size"]
        left, top = round((new[0] - crop) / 2), round((new[1] - crop) / 2)
        img = img.crop((left, top, left + crop, top + crop))
        chw = np.asarray(img, np.float32).transpose(2, 0, 1)
        return (chw - self.mean) * self.scale

    def feeds(self, items: list) -> dict[str, np.ndarray]:
        if self.kind == "text":
            return self.text_feeds(items)
        return {"pixel_values": np.ascontiguousarray(np.stack([self.image_array(b) for b in items]))}

    # --- inference ----------------------------------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([OUTPUT], {k: feeds[k] for k in self.inputs})[0]

    def answers(self, probs: np.ndarray) -> list[dict]:
        best = probs.argmax(axis=1)
        return [{"label": self.labels[int(i)], "score": float(p[i])} for i, p in zip(best, probs)]

    def predict(self, items: list) -> list[dict]:
        return self.answers(self.run(self.feeds(items)))
