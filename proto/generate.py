"""Regenerate the Python stubs of `proto/pdserve.proto` (needs grpcio-tools, a dev dependency):

python -m proto.generate            # writes proto/pdserve_pb2.py, _pb2.pyi, _pb2_grpc.py
python -m proto.generate --check    # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = ("pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{HERE.parent}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(HERE / "pdserve.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on proto/pdserve.proto")


# The versions of protoc and grpcio-tools that generated a stub, stamped into it: a newer
# patch release of the tools changes them and nothing else, so they do not make a stub stale.
_VERSION_STAMPS = (
    re.compile(r"^(GRPC_GENERATED_VERSION = ).*$", re.M),
    re.compile(r"^(# Protobuf Python Version: ).*$", re.M),
    re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)[\s\d,]*"),
)


def _unstamped(text: str) -> str:
    for stamp in _VERSION_STAMPS:
        text = stamp.sub(r"\1<version>", text)
    return text


def stale_files() -> list[str]:
    """Stubs that differ from what the .proto generates now (beyond the tools' versions)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for name in OUTPUTS:
            fresh = (Path(tmp) / "proto" / name).read_text()
            committed = HERE / name
            if not committed.is_file() or _unstamped(committed.read_text()) != _unstamped(fresh):
                stale.append(name)
                if committed.is_file():
                    diff = difflib.unified_diff(
                        committed.read_text().splitlines(), fresh.splitlines(), lineterm=""
                    )
                    print("\n".join(list(diff)[:20]), file=sys.stderr)
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale: {stale}; run python -m proto.generate", file=sys.stderr)
            return 1
        return 0
    generate(HERE.parent)
    print(f"wrote {', '.join(OUTPUTS)} in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
