"""Generated protobuf modules (regenerate with scripts/gen_protos.sh; do not edit *_pb2 files by hand)."""
