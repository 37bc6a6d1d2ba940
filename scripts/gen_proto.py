"""Generates the Python stubs of proto/headserve/v1/headserve.proto into service/gen/.

The stubs are committed; tests/test_proto_fresh.py fails when they are stale.
Run: python scripts/gen_proto.py [OUT_DIR]
"""

from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = "headserve/v1/headserve.proto"
GENERATED = ("headserve_pb2.py", "headserve_pb2.pyi", "headserve_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / "proto" / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    nested = out_dir / "headserve" / "v1"
    for name in GENERATED:
        text = (nested / name).read_text()
        # The gRPC stub imports its messages by proto path; make it package-relative.
        text = text.replace("from headserve.v1 import headserve_pb2", "from . import headserve_pb2")
        (out_dir / name).write_text(text)
        (nested / name).unlink()
    for d in (nested, nested.parent):
        d.rmdir()


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "service" / "gen")
