#!/usr/bin/env bash
# The Python packages that the GPU machine's image lacks for the serving-path runs there (Ray,
# NIXL for CUDA 13, the HTTP and gRPC stack), as cp312 wheels of the versions this checkout's
# .venv runs. One device call carries at most 64 MiB and the Ray wheel alone is ~76 MiB, so they
# travel in three calls. The kernel tests and offline benchmarks (benchmarks/gpu_checks.sh) need
# none of this: the image has torch, triton and transformers.
#
# Here, where pip reaches PyPI (after scripts/setup.sh):
#     bash benchmarks/gpu_wheels.sh fetch
#   -> .whl/a (Ray, first part), .whl/b (Ray, second part, and the small wheels), .whl/c (NIXL)
# On the device, three calls in a row (files outside the repository last only while the machine
# stays warm, under 30 s between calls), each carrying its folder:
#     carry [".whl/a"]:  bash benchmarks/gpu_wheels.sh stage
#     carry [".whl/b"]:  bash benchmarks/gpu_wheels.sh install
#     carry [".whl/c"]:  bash benchmarks/gpu_wheels.sh nixl
# and every later call starts with:  export PYTHONPATH=/tmp/pdserve-site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${PDSERVE_WHEEL_STAGE:-/tmp/pdserve-wheels}
SITE=${PDSERVE_SITE:-/tmp/pdserve-site}
PY=${PYTHON:-python3}
step=${1:?usage: gpu_wheels.sh fetch|stage|install|nixl}

# What the image lacks (its package list: the device tool's KINDS.md). grpcio and protobuf come
# along because the generated gRPC code needs versions at least as new as the ones it was made
# with.
SMALL=(fastapi starlette uvicorn httptools pydantic pydantic_core annotated-types annotated-doc
  typing-inspection jsonschema jsonschema-specifications referencing rpds-py grpcio
  grpcio-health-checking grpcio-reflection protobuf)

install_wheels() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$@"
}

case "$step" in
  fetch)
    version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
    download() {
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform any -d "$1" "$2"
    }
    rm -rf .whl/a .whl/b .whl/c .whl/tmp
    mkdir -p .whl/a .whl/b .whl/c .whl/tmp
    echo "ray $(version ray)"
    download .whl/tmp "ray==$(version ray)"
    ray_wheel=$(basename .whl/tmp/ray-*.whl)
    split -b 40m -d .whl/tmp/"$ray_wheel" .whl/tmp/ray.part-
    mv .whl/tmp/ray.part-00 .whl/a/
    mv .whl/tmp/ray.part-0[1-9] .whl/b/
    echo "$ray_wheel" > .whl/b/ray.name
    for pkg in "${SMALL[@]}"; do
      echo "$pkg $(version "$pkg")"
      download .whl/b "$pkg==$(version "$pkg")"
    done
    # NIXL's CUDA 13 build, the version of the CUDA 12 one installed here.
    echo "nixl-cu13 $(version nixl-cu12)"
    download .whl/c "nixl-cu13==$(version nixl-cu12)"
    rm -rf .whl/tmp
    du -sh .whl/a .whl/b .whl/c
    ;;
  stage)
    mkdir -p "$STAGE"
    cp .whl/a/ray.part-* "$STAGE"/
    ls -la "$STAGE"
    ;;
  install)
    ray_wheel=$(cat .whl/b/ray.name)
    cat "$STAGE"/ray.part-00 .whl/b/ray.part-* > "$STAGE/$ray_wheel"
    install_wheels "$STAGE/$ray_wheel" .whl/b/*.whl
    PYTHONPATH="$SITE" "$PY" -c "import ray, fastapi, uvicorn, grpc_health.v1, grpc_reflection; \
print('ray', ray.__version__, 'installed in $SITE')"
    ;;
  nixl)
    install_wheels .whl/c/*.whl
    PYTHONPATH="$SITE" "$PY" -c "import nixl_cu13; print('nixl_cu13 installed in $SITE')"
    ;;
  *)
    echo "unknown step $step (fetch|stage|install|nixl)" >&2
    exit 2
    ;;
esac
