#!/usr/bin/env bash
# Set up sphereface-prune: a Python virtual environment with pycaffe in it.
#
#   scripts/setup.sh [--gpu] [--cudnn] [--rebuild]
#
# 1. .venv from requirements.txt (re-installed only when that file changes).
#    At the end, whichever Caffe is used: base/caffe_superset.proto (BVLC's
#    caffe.proto plus the Caffe forks' fields, read by the toolkit's own file
#    I/O) is compiled with protoc into the venv (again only when it changes).
# 2. If `import caffe` already works (your own Caffe via PYTHONPATH, or
#    CAFFE_ROOT=/path/to/caffe with python/ built), that Caffe is used and
#    nothing is built.
# 3. Otherwise BVLC Caffe is built from source, with the Python layer, into
#    $CAFFE_PREFIX (default .caffe/install): from CAFFE_SRC if set, else from
#    Debian's bullseye `caffe` source package (fetched through a private apt
#    configuration that borrows this machine's Debian mirror).
#
# Options:
#   --gpu      build with CUDA (needs nvcc on PATH); CPU-only otherwise
#   --cudnn    with --gpu, also use cuDNN
#   --rebuild  rebuild Caffe even if `import caffe` works
# Environment:
#   PYTHON        interpreter for the venv (default: python3)
#   VENV          venv directory (default: .venv in the repository)
#   CAFFE_ROOT    an existing Caffe checkout whose python/ should be used
#   CAFFE_SRC     a Caffe source tree to build instead of Debian's package
#   CAFFE_PREFIX  install prefix of the build (default: .caffe/install)
#   JOBS          parallel compile jobs (default: number of cores)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK="$ROOT/.caffe"
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
GPU=0; CUDNN=0; REBUILD=0
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    --cudnn) CUDNN=1 ;;
    --rebuild) REBUILD=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$GPU" = 1 ]; then VARIANT=gpu; else VARIANT=cpu; fi
CAFFE_PREFIX=${CAFFE_PREFIX:-$WORK/install-$VARIANT}

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nsetup.sh: error: %s\n' "$*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  die "need root to run: $*  (run setup.sh as root, or install those packages yourself)"; fi; }

# Debian packages needed to build Caffe (and the Python headers/venv module).
APT_DEPS=(build-essential cmake dpkg-dev pkg-config
  libboost-filesystem-dev libboost-system-dev libboost-thread-dev libboost-python-dev
  libgflags-dev libgoogle-glog-dev libhdf5-dev libleveldb-dev liblmdb-dev
  libopenblas-dev libopencv-dev libprotobuf-dev libprotoc-dev protobuf-compiler
  libsnappy-dev python3-dev python3-venv)

missing_apt_deps() {
  local p out=()
  for p in "${APT_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || out+=("$p")
  done
  echo "${out[@]:-}"
}

install_apt_deps() {
  command -v dpkg-query >/dev/null && command -v apt-get >/dev/null || die \
"this is not a Debian-like system (no apt-get). Building Caffe needs: a C++ compiler,
cmake, Boost (filesystem, system, thread, python3), gflags, glog, HDF5, LevelDB, LMDB,
OpenBLAS, OpenCV, protobuf + protoc, snappy and the Python headers. Install them, or
point CAFFE_ROOT at a Caffe whose python/ is built, then re-run."
  local missing; missing=$(missing_apt_deps)
  if [ -z "$missing" ]; then echo "all build dependencies present"; return; fi
  echo "installing: $missing"
  as_root apt-get update -q || die "apt-get update failed"
  # shellcheck disable=SC2086
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing \
    || die "apt-get install failed for: $missing"
}

# ---------------------------------------------------------------- 1. venv
step "Python environment ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH; install Python 3 (Debian: apt-get install python3 python3-venv python3-dev)"
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    echo "'$PYTHON -m venv' failed; installing python3-venv"
    as_root apt-get update -q && as_root apt-get install -y -q python3-venv python3-dev
    "$PYTHON" -m venv "$VENV" || die "could not create a virtual environment with $PYTHON"
  fi
fi
PY="$VENV/bin/python"
REQ_STAMP="$VENV/.requirements.sha256"
REQ_SHA=$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$REQ_SHA" ]; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -r "$ROOT/requirements.txt" || die "pip install -r requirements.txt failed"
  echo "$REQ_SHA" > "$REQ_STAMP"
else
  echo "requirements.txt unchanged, packages already installed"
fi
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The repository itself on the venv's path, so `python -m prune` works from anywhere.
echo "$ROOT" > "$SITE/sphereface_prune.pth"

# The toolkit's superset caffe.proto (base/proto.py loads it; protoc is a Caffe build dependency anyway).
compile_superset() {
  step "Superset caffe.proto for the toolkit's own file I/O (BVLC + Caffe forks' fields)"
  local proto="$ROOT/base/caffe_superset.proto" stamp="$SITE/caffe_superset.sha256" sha
  sha=$(sha256sum "$proto" | cut -d' ' -f1)
  if [ -f "$SITE/caffe_superset_pb2.py" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$sha" ]; then
    echo "base/caffe_superset.proto unchanged, already compiled"
    return
  fi
  if ! command -v protoc >/dev/null; then
    echo "protoc not found; installing protobuf-compiler"
    { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends protobuf-compiler; } || die "cannot install protobuf-compiler (protoc), which compiles base/caffe_superset.proto; install it and re-run"
  fi
  rm -f "$stamp"
  protoc --proto_path="$ROOT/base" --python_out="$SITE" "$proto" || die "protoc failed on base/caffe_superset.proto"
  "$PY" -c 'import caffe_superset_pb2' || die "the compiled caffe_superset_pb2 does not import (protoc $(protoc --version) against the protobuf Python package of requirements.txt)"
  echo "$sha" > "$stamp"
  echo "compiled with $(protoc --version) into $SITE/caffe_superset_pb2.py"
}

caffe_works() { "$PY" -c 'import caffe, caffe.proto.caffe_pb2' >/dev/null 2>&1; }
pin_caffe() {  # make the found Caffe importable without any environment variable
  local dir; dir=$("$PY" -c 'import caffe, os; print(os.path.dirname(os.path.dirname(caffe.__file__)))')
  echo "$dir" > "$SITE/caffe.pth"
  echo "using Caffe from $dir"
}

# ------------------------------------------------------ 2. existing Caffe?
step "Looking for a working pycaffe"
if [ -n "${CAFFE_ROOT:-}" ]; then
  [ -d "$CAFFE_ROOT/python/caffe" ] || die "CAFFE_ROOT=$CAFFE_ROOT has no python/caffe directory"
  export PYTHONPATH="$CAFFE_ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$REBUILD" = 0 ] && caffe_works; then
  pin_caffe
  "$PY" -c 'import caffe; print("pycaffe OK:", caffe.__file__)'
  compile_superset
  exit 0
fi
# A previous build of ours, e.g. after the venv was recreated.
if [ "$REBUILD" = 0 ] && [ -z "${CAFFE_ROOT:-}" ] && [ -d "$CAFFE_PREFIX/lib/python3/dist-packages/caffe" ]; then
  echo "$CAFFE_PREFIX/lib/python3/dist-packages" > "$SITE/caffe.pth"
  if caffe_works; then pin_caffe; compile_superset; exit 0; fi
  rm -f "$SITE/caffe.pth"
fi
if [ -n "${CAFFE_ROOT:-}" ]; then
  die "CAFFE_ROOT=$CAFFE_ROOT is set but 'import caffe' fails there; error:
$("$PY" -c 'import caffe' 2>&1 | tail -3)"
fi
rm -f "$SITE/caffe.pth"

# ------------------------------------------------------------ 3. build it
step "Build dependencies (Debian packages)"
install_apt_deps

if [ "$GPU" = 1 ]; then
  command -v nvcc >/dev/null || die "--gpu asked for, but nvcc is not on PATH (install the CUDA toolkit, or drop --gpu)"
fi

step "Caffe source"
if [ -n "${CAFFE_SRC:-}" ]; then
  [ -f "$CAFFE_SRC/CMakeLists.txt" ] && [ -d "$CAFFE_SRC/src/caffe" ] || die "CAFFE_SRC=$CAFFE_SRC does not look like a Caffe source tree"
  SRC=$(cd "$CAFFE_SRC" && pwd)
else
  SRC=$(ls -d "$WORK"/src/caffe-*/ 2>/dev/null | head -1 || true)
  if [ -z "$SRC" ]; then
    MIRROR=$(python3 "$ROOT/scripts/apt_mirror.py") || die "cannot find this machine's Debian mirror in its apt sources; set CAFFE_SRC to a Caffe source tree instead"
    APTDIR="$WORK/apt"
    mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/parts" "$WORK/src"
    # A private apt configuration: the system's sources list is left alone.
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bullseye main" > "$APTDIR/sources.list"
    APT_OPTS=(-o "Dir::Etc::SourceList=$APTDIR/sources.list" -o "Dir::Etc::SourceParts=$APTDIR/parts"
              -o "Dir::State::Lists=$APTDIR/lists" -o "Dir::Cache=$APTDIR/cache" -o "APT::Sandbox::User=root")
    echo "fetching Debian bullseye source package 'caffe' from $MIRROR"
    apt-get "${APT_OPTS[@]}" update -q || die "apt-get update of the bullseye deb-src entry failed; set CAFFE_SRC to a Caffe source tree instead"
    (cd "$WORK/src" && apt-get "${APT_OPTS[@]}" source -q caffe) \
      || die "apt-get source caffe failed; set CAFFE_SRC to a Caffe source tree instead"
    SRC=$(ls -d "$WORK"/src/caffe-*/ | head -1)
  fi
  SRC=${SRC%/}
fi
echo "source: $SRC"

# protobuf >= 3.6 dropped the second (warning threshold) argument.
IO_CPP="$SRC/src/caffe/util/io.cpp"
if grep -q 'SetTotalBytesLimit(kProtoReadBytesLimit, *[0-9]*)' "$IO_CPP"; then
  echo "patching SetTotalBytesLimit for modern protobuf in $IO_CPP"
  sed -i 's/SetTotalBytesLimit(kProtoReadBytesLimit, *[0-9]*)/SetTotalBytesLimit(kProtoReadBytesLimit)/' "$IO_CPP"
fi

step "Configure ($VARIANT)"
BUILD="$WORK/build-$VARIANT"
mkdir -p "$BUILD"
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
PY_LIB=$("$PY" -c 'import sysconfig, os; v=sysconfig.get_config_var; print(os.path.join(v("LIBDIR"), v("LDLIBRARY")))')
NP_INC=$("$PY" -c 'import numpy; print(numpy.get_include())')
PY_VER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
CMAKE_ARGS=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$CAFFE_PREFIX"
  -DCMAKE_INSTALL_RPATH="$CAFFE_PREFIX/lib" -DCMAKE_INSTALL_RPATH_USE_LINK_PATH=ON
  -DBUILD_python=ON -DBUILD_python_layer=ON -Dpython_version="$PY_VER" -DBUILD_docs=OFF -DBUILD_matlab=OFF
  -DPYTHON_EXECUTABLE="$PY" -DPYTHON_INCLUDE_DIR="$PY_INC" -DPYTHON_LIBRARY="$PY_LIB"
  -DNUMPY_INCLUDE_DIR="$NP_INC"
  -DBLAS=Open -DUSE_OPENCV=ON -DUSE_LMDB=ON -DUSE_LEVELDB=ON -DUSE_HDF5=ON)
if [ "$GPU" = 1 ]; then
  CMAKE_ARGS+=(-DCPU_ONLY=OFF -DUSE_CUDNN=$([ "$CUDNN" = 1 ] && echo ON || echo OFF) -DUSE_NCCL=OFF)
  # Caffe's own arch list predates the GPUs current CUDA supports: ask the driver.
  CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '.' || true)
  [ -n "$CAP" ] && CMAKE_ARGS+=(-DCUDA_ARCH_NAME=Manual -DCUDA_ARCH_BIN="$CAP" -DCUDA_ARCH_PTX="$CAP")
else
  CMAKE_ARGS+=(-DCPU_ONLY=ON -DUSE_CUDNN=OFF)
fi
if [ ! -f "$BUILD/CMakeCache.txt" ] || [ "$(cat "$BUILD/.args" 2>/dev/null)" != "${CMAKE_ARGS[*]}" ]; then
  (cd "$BUILD" && cmake "${CMAKE_ARGS[@]}" "$SRC" > cmake.log 2>&1) || {
    tail -30 "$BUILD/cmake.log"; die "CMake configuration failed (full log: $BUILD/cmake.log)"; }
  echo "${CMAKE_ARGS[*]}" > "$BUILD/.args"
fi

step "Build with $JOBS jobs (log: $BUILD/build.log)"
START=$(date +%s)
(cd "$BUILD" && make -j"$JOBS" > build.log 2>&1 && make install > install.log 2>&1) || {
  grep -m 20 -E 'error|Error' "$BUILD/build.log" || tail -30 "$BUILD/build.log"
  die "Caffe build failed (full log: $BUILD/build.log)"; }
echo "built and installed into $CAFFE_PREFIX in $(( $(date +%s) - START )) s"

# Debian's patch installs the module under lib/python3/dist-packages; upstream under python/.
for d in "$CAFFE_PREFIX/lib/python3/dist-packages" "$CAFFE_PREFIX/python"; do
  if [ -d "$d/caffe" ]; then echo "$d" > "$SITE/caffe.pth"; break; fi
done
[ -f "$SITE/caffe.pth" ] || die "installed Caffe has no python/caffe package under $CAFFE_PREFIX"

step "Checking pycaffe"
"$PY" - <<'PYCHECK' || die "the freshly built pycaffe does not import (see above)"
import caffe
from caffe.proto import caffe_pb2
print("pycaffe OK:", caffe.__file__)
print("layer types:", len(caffe.layer_type_list()), "incl. Python:", "Python" in caffe.layer_type_list())
PYCHECK
compile_superset
