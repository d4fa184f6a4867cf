#!/usr/bin/env bash
# Regenerate the Python modules for every enpipeline/proto/*.proto (run from the repo root).
# The generated *_pb2.py / *_pb2.pyi / *_pb2_grpc.py files are committed: runtime needs protobuf and grpcio,
# not grpcio-tools.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [[ ! -x "$PYTHON" ]]; then PYTHON=python3; fi

PROTO_DIR=enpipeline/proto
shopt -s nullglob
protos=("$PROTO_DIR"/*.proto)
if (( ${#protos[@]} == 0 )); then
    echo "no .proto files in $PROTO_DIR" >&2
    exit 1
fi

"$PYTHON" -m grpc_tools.protoc -I "$PROTO_DIR" --python_out="$PROTO_DIR" --pyi_out="$PROTO_DIR" "${protos[@]}"
# gRPC stubs only for files that define a service (the others would get empty *_pb2_grpc.py modules).
for proto in "${protos[@]}"; do
    if grep -qE '^service ' "$proto"; then
        "$PYTHON" -m grpc_tools.protoc -I "$PROTO_DIR" --grpc_python_out="$PROTO_DIR" "$proto"
    fi
done

# protoc emits `import foo_pb2 as foo__pb2` for a sibling .proto import, which only resolves when
# enpipeline/proto is on sys.path; rewrite those to package imports so `from enpipeline.proto import x_pb2` works.
for proto in "${protos[@]}"; do
    base="$(basename "$proto" .proto)"
    for out in "$PROTO_DIR/${base}_pb2.py" "$PROTO_DIR/${base}_pb2.pyi" "$PROTO_DIR/${base}_pb2_grpc.py"; do
        [[ -f "$out" ]] || continue
        sed -i -E 's/^import ([A-Za-z0-9_]+_pb2) as /from enpipeline.proto import \1 as /' "$out"
    done
done

"$PYTHON" - <<'PY'
import importlib, pathlib
for p in sorted(pathlib.Path("enpipeline/proto").glob("*_pb2.py")):
    importlib.import_module(f"enpipeline.proto.{p.stem}")
    print(f"ok enpipeline.proto.{p.stem}")
PY
