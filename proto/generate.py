"""Regenerate the Python stubs of the .proto files beside this script.

    python proto/generate.py

The generated modules are committed, so installing the project needs no protoc; a test checks
they match their .proto files.

The KServe messages (``grpc_service.proto``, package ``inference``) are built in a descriptor
pool of their own (`KSERVE_POOL`), not protobuf's default one: tritonclient registers its own
``inference`` package there, and two files defining the same symbols in one pool cannot both
load. With the private pool, the server, its tests and tools can import tritonclient and the
server's KServe stubs in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PACKAGE = "gradcam_proto"
PRIVATE_POOL_MODULES = ("grpc_service_pb2.py",)
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
KSERVE_POOL = (
    "# A pool of its own: tritonclient defines the same 'inference' symbols in the default one.\n"
    "KSERVE_POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = KSERVE_POOL.AddSerializedFile("
)


def generate(out_dir: Path = HERE) -> None:
    protos = sorted((HERE / PACKAGE).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(HERE)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for name in PRIVATE_POOL_MODULES:
        module = out_dir / PACKAGE / name
        text = module.read_text()
        if text.count(DEFAULT_POOL) != 1:
            raise SystemExit(f"{module}: the descriptor pool line protoc writes was not found")
        module.write_text(text.replace(DEFAULT_POOL, KSERVE_POOL))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
