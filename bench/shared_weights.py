#!/usr/bin/env python
"""How many tuned tasks can share one copy of a backbone's weights in onnxruntime: the options, measured.

    python bench/shared_weights.py [--tasks 20] [--rows 160] [--rounds 200]

A tuned text task today holds its own copy of the blocks it tuned (43 MB for minilm-l6's six). A low-rank
(LoRA-style) tuning keeps the base weight W and learns y = xW + (xA)B with A, B of rank r, so the base could be
shared. This measures, on one layer shaped like minilm-l6's feed-forward input (384 -> 1536, one intra-op
thread, `--rows` token rows, no memory arena so that RSS counts weights), what each way of running such tasks
costs in onnxruntime per task (RSS) and per run:

  merged       each task's own session with W + AB folded into one initializer (what a tuned head is now)
  external     each task's session has W as external data, given from memory with
               SessionOptions.add_external_initializers (one OrtValue for all)
  external-np  the same with prepacking off (session.disable_prepacking)
  w-as-input   each task's session takes W as a graph input, fed the same numpy array every run
  adapters     one session for every task: W an initializer, A and B graph inputs fed per run

Prints a table and writes bench/results/shared_weights.json. Outputs are checked against numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
D_IN, D_OUT, RANK = 384, 1536, 8


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(kind: str, w: np.ndarray, a: np.ndarray, b: np.ndarray) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D_IN])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D_OUT])
    inputs, inits = [x], []
    if kind == "merged":
        inits.append(numpy_helper.from_array(w + a @ b, "W"))
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("MatMul", ["x", "A"], ["xa"]),
                 helper.make_node("MatMul", ["xa", "B"], ["xab"]), helper.make_node("Add", ["xw", "xab"], ["y"])]
        if kind == "adapters":
            inits.append(numpy_helper.from_array(w, "W"))
            inputs += [helper.make_tensor_value_info("A", TensorProto.FLOAT, [D_IN, "r"]),
                       helper.make_tensor_value_info("B", TensorProto.FLOAT, ["r", D_OUT])]
        else:
            inits += [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")]
            if kind == "w-as-input":
                inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [D_IN, D_OUT]))
            else:  # external: W's bytes are not in the model; the session is given them
                t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[D_IN, D_OUT],
                                data_location=TensorProto.EXTERNAL)
                entry = t.external_data.add()
                entry.key, entry.value = "location", "shared-base-weight"
                inits.append(t)
    graph = helper.make_graph(nodes, kind, inputs, [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def measure(kind: str, tasks: int, rows: int, rounds: int) -> dict:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32) * 0.05
    adapters = [(rng.normal(size=(D_IN, RANK)).astype(np.float32) * 0.05,
                 rng.normal(size=(RANK, D_OUT)).astype(np.float32) * 0.05) for _ in range(tasks)]
    x = rng.normal(size=(rows, D_IN)).astype(np.float32)
    shared = ort.OrtValue.ortvalue_from_numpy(w)
    before = rss_mib()
    sessions, feeds = [], []
    for t, (a, b) in enumerate(adapters):
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = False  # each session's arena would hide what its weights cost
        if kind.startswith("external"):
            so.add_external_initializers(["W"], [shared])
        if kind == "external-np":
            so.add_session_config_entry("session.disable_prepacking", "1")
        if kind != "adapters" or not sessions:
            sessions.append(ort.InferenceSession(build(kind.split("-np")[0], w, a, b), so,
                                                 providers=["CPUExecutionProvider"]))
        feeds.append({"x": x, **({"A": a, "B": b} if kind == "adapters" else {"W": w} if kind == "w-as-input"
                                 else {})})
    session_of = (lambda t: sessions[0]) if kind == "adapters" else (lambda t: sessions[t])
    worst = 0.0
    for t, (a, b) in enumerate(adapters):
        out = session_of(t).run(None, feeds[t])[0]
        worst = max(worst, float(np.abs(out - x @ (w + a @ b)).max()))
    per_task = (rss_mib() - before) / tasks
    times = []
    for r in range(rounds + 20):
        t = r % tasks
        start = time.perf_counter()
        session_of(t).run(None, feeds[t])
        if r >= 20:
            times.append(time.perf_counter() - start)
    return {"kind": kind, "sessions": len(sessions), "rss_mib_per_task": per_task,
            "run_p50_us": 1e6 * statistics.median(times), "max_abs_error": worst}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--rows", type=int, default=160, help="token rows per run (8 sentences of 20 tokens)")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--kinds", nargs="+", default=["merged", "external", "external-np", "w-as-input", "adapters"])
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    args = p.parse_args()
    rows = []
    for kind in args.kinds:  # each in its own process, so that one kind's freed memory does not hide another's
        out = subprocess.run([sys.executable, __file__, "--child-kind", kind, str(args.tasks), str(args.rows),
                              str(args.rounds)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    weight_mib = D_IN * D_OUT * 4 / 2**20
    merged = next((r for r in rows if r["kind"] == "merged"), rows[0])
    print(f"one {D_IN}x{D_OUT} layer ({weight_mib:.2f} MiB fp32), rank {RANK}, {args.tasks} tasks, {args.rows} rows, "
          f"1 thread, no arena, load average {os.getloadavg()[0]:.2f}")
    print("| way | sessions | RSS MiB per task | run p50 us | run / merged | max error |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['sessions']} | {r['rss_mib_per_task']:.2f} | {r['run_p50_us']:.0f} | "
              f"{r['run_p50_us'] / merged['run_p50_us']:.2f}x | {r['max_abs_error']:.1e} |")
    args.results.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    record = {"layer": [D_IN, D_OUT], "rank": RANK, "tasks": args.tasks, "rows": args.rows,
              "onnxruntime": ort.__version__, "machine": platform.processor() or platform.machine(),
              "load_average": os.getloadavg(), "rows_measured": rows}
    (args.results / "shared_weights.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child-kind":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
        sys.exit(0)
    sys.exit(main())
