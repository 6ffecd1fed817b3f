#!/usr/bin/env bash
# Build real Caffe + pycaffe + the Caffe tools from the PyPI sdist brocolli-caffe==9.0.2 into a cache folder
# outside the checkout, and link them into a virtualenv.
#
#   scripts/build_caffe.sh VENV_PYTHON
#
# What gets built (the fork's CMake builds only _caffe.so; this script patches it back to BVLC's layout):
#   libcaffe.so            the library, with LMDB and OpenCV (so Data / ImageData layers run)
#   python/caffe/_caffe.so pycaffe, linked against libcaffe.so
#   tools/caffe, convert_imageset, compute_image_mean, upgrade_net_proto_text, ... linked into VENV/bin
#
# CPU only by default. DEEPREBIRTH_CUDA=1 builds with CUDA (no cuDNN); DEEPREBIRTH_CUDA=auto does so only where
# `nvidia-smi -L` lists a GPU and `nvcc` is on PATH (a bare nvcc, as on CI images, never switches CUDA on).
#
# The build is keyed by the sdist version, this recipe's revision, the interpreter, numpy's major version and the
# flavour (cpu/cuda), so a second run finds the finished build and only relinks it (seconds). Set DEEPREBIRTH_CACHE
# to move the cache (default ~/.cache/deeprebirth). Older cache folders are left alone.
set -euo pipefail

PY=${1:?usage: build_caffe.sh VENV_PYTHON}
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac  # the build cd's elsewhere
VENV_BIN=$(dirname "$PY")
SDIST_VERSION=9.0.2
RECIPE=2  # 1: pycaffe only; 2: + libcaffe.so, the tools, LMDB, OpenCV, optional CUDA
CACHE=${DEEPREBIRTH_CACHE:-$HOME/.cache/deeprebirth}
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYTAG=${PYVER/./}
NPMAJOR=$("$PY" -c 'import numpy; print(numpy.__version__.split(".")[0])')

log() { printf '[build_caffe] %s\n' "$*" >&2; }

case "${DEEPREBIRTH_CUDA:-0}" in
    1|yes|on) FLAVOUR=cuda ;;
    auto) if command -v nvcc >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then FLAVOUR=cuda; else FLAVOUR=cpu; fi ;;
    *) FLAVOUR=cpu ;;
esac
if [ "$FLAVOUR" = cuda ]; then
    command -v nvcc >/dev/null \
        || { log "DEEPREBIRTH_CUDA=1 but nvcc is not on PATH (install the CUDA toolkit, or unset DEEPREBIRTH_CUDA)"; exit 1; }
    CUDA_ROOT=${CUDA_HOME:-${CUDA_PATH:-}}
    [ -z "$CUDA_ROOT" ] && [ -d /usr/local/cuda ] && CUDA_ROOT=/usr/local/cuda
    [ -z "$CUDA_ROOT" ] && CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    for lib in cudart cublas curand; do
        compgen -G "$CUDA_ROOT/lib64/lib$lib.so*" >/dev/null || compgen -G "$CUDA_ROOT/lib/lib$lib.so*" >/dev/null \
            || compgen -G "/usr/lib/x86_64-linux-gnu/lib$lib.so*" >/dev/null || { log "the CUDA toolkit at $CUDA_ROOT has no lib$lib (Caffe needs cudart, cuBLAS and" \
                                    "cuRAND; set CUDA_HOME to a full toolkit)"; exit 1; }
    done
fi

BUILD_ROOT="$CACHE/caffe-brocolli-$SDIST_VERSION-r$RECIPE-py$PYTAG-np$NPMAJOR-$FLAVOUR"
SRC="$BUILD_ROOT/src"
STAMP="$BUILD_ROOT/.built"
TOOLS="caffe convert_imageset compute_image_mean upgrade_net_proto_text upgrade_net_proto_binary
  upgrade_solver_proto_text extract_features"
OPENCV_MODULES="core imgproc imgcodecs highgui videoio"

APT_PACKAGES="build-essential cmake pkg-config libboost-system-dev libboost-thread-dev libboost-filesystem-dev
  libboost-python-dev libboost-regex-dev libgtest-dev libprotobuf-dev protobuf-compiler libgoogle-glog-dev
  libgflags-dev libhdf5-dev libopenblas-dev graphviz liblmdb-dev"
for m in $OPENCV_MODULES; do APT_PACKAGES="$APT_PACKAGES libopencv-$m-dev"; done

install_apt_packages() {
    local missing=()
    for pkg in $APT_PACKAGES; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing apt packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

link_into_venv() {
    local site tool
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$SRC/python" > "$site/deeprebirth_pycaffe.pth"
    GLOG_minloglevel=2 "$PY" -c 'import caffe; caffe.set_mode_cpu()' \
        || { log "pycaffe does not import from $PY"; exit 1; }
    for tool in $TOOLS; do
        [ -x "$SRC/build/tools/$tool" ] || { log "tool $tool missing from $SRC/build/tools"; exit 1; }
        ln -sfn "$SRC/build/tools/$tool" "$VENV_BIN/$tool"
    done
    "$VENV_BIN/caffe" --version >/dev/null 2>&1 || { log "$VENV_BIN/caffe does not run"; exit 1; }
    log "pycaffe and the Caffe tools ($(echo $TOOLS | tr ' ' ',')) linked into $VENV_BIN (build: $BUILD_ROOT)"
}

# The fork's `caffe train` ignores -weights (its train() never loads them), so fine-tuning from a caffemodel
# silently starts from the fillers. Put the loading back: each comma-separated caffemodel in turn, a later one
# over an earlier one (BVLC's semantics, which `deeprebirth finetune --export` relies on).
WEIGHTS_MARK="// deeprebirth: -weights"
patch_tools() {
    "$PY" - "$1" "$WEIGHTS_MARK" <<'PYEOF'
import sys
from pathlib import Path

path, mark = Path(sys.argv[1]) / "tools/caffe.cpp", sys.argv[2]
text = path.read_text()
if mark not in text:
    anchor = "  solver->SetActionFunction(signal_handler.GetActionFunction());\n"
    if text.count(anchor) != 1:
        sys.exit(f"[build_caffe] patch does not apply to tools/caffe.cpp: {anchor.strip()!r}")
    load = (f"  {mark}\n"
            "  if (FLAGS_weights.size()) {\n"
            "    vector<string> files;\n"
            "    boost::split(files, FLAGS_weights, boost::is_any_of(\",\"));\n"
            "    for (int i = 0; i < files.size(); ++i) {\n"
            "      LOG(INFO) << \"Finetuning from \" << files[i];\n"
            "      solver->net()->CopyTrainedLayersFrom(files[i]);\n"
            "      for (int j = 0; j < solver->test_nets().size(); ++j) {\n"
            "        solver->test_nets()[j]->CopyTrainedLayersFrom(files[i]);\n"
            "      }\n"
            "    }\n"
            "  }\n")
    path.write_text(text.replace(anchor, anchor + load))
PYEOF
}

install_apt_packages

if [ -f "$STAMP" ]; then
    log "cached build found"
    if ! grep -qF "$WEIGHTS_MARK" "$SRC/tools/caffe.cpp"; then
        log "rebuilding tools/caffe so that \`caffe train -weights\` loads the weights"
        patch_tools "$SRC"
        make -C "$SRC/build" caffe.bin > "$BUILD_ROOT/make-tools.log" 2>&1 \
            || { tail -20 "$BUILD_ROOT/make-tools.log"; log "rebuilding tools/caffe failed"; exit 1; }
    fi
    link_into_venv
    exit 0
fi

log "building Caffe ($FLAVOUR) from brocolli-caffe==$SDIST_VERSION into $BUILD_ROOT (about 5 minutes on 2 cores)"
rm -rf "$BUILD_ROOT"
mkdir -p "$BUILD_ROOT/download"
"$PY" -m pip download --quiet --no-deps --no-binary :all: "brocolli-caffe==$SDIST_VERSION" -d "$BUILD_ROOT/download"
mkdir -p "$SRC"
tar xzf "$BUILD_ROOT/download/brocolli-caffe-$SDIST_VERSION.tar.gz" -C "$SRC" --strip-components=1

# Source patches, each checked: the sdist is pinned, so a patch that no longer applies is a hard error.
"$PY" - "$SRC" "$PYTAG" "$FLAVOUR" <<'PYEOF'
import re, sys
from pathlib import Path

src, pytag, flavour = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


def patch(rel, old, new, count=1):
    path = src / rel
    text = path.read_text()
    if text.count(old) < 1:
        sys.exit(f"[build_caffe] patch does not apply to {rel}: {old[:60]!r}")
    path.write_text(text.replace(old, new, count))


# python/caffe/io.py imports scikit-image and scipy at the top; only its image helpers use them.
io_py = src / "python/caffe/io.py"
text = io_py.read_text().replace("import skimage.io\nfrom scipy.ndimage import zoom\n", "")
for func in ("load_image", "resize_image"):
    text = re.sub(r"(def %s\([^)]*\):\n(?:    \"\"\"[\s\S]*?\"\"\"\n)?)" % func,
                  lambda m: m.group(1) + "    import skimage.io\n    from scipy.ndimage import zoom\n", text, count=1)
io_py.write_text(text)

# OpenCV 4: the umbrella header needs every module; the video layer only needs videoio.
patch("include/caffe/layers/video_data_layer.hpp", "#include <opencv2/opencv.hpp>", "#include <opencv2/videoio.hpp>")

# BVLC's layout: libcaffe.so holds the library; pycaffe (_caffe.so) and the tools link it. Debian ships only the
# versioned boost_python library (libboost_python311.so).
libs = ("-lglog -lgflags -lprotobuf -lboost_thread -lboost_system -lboost_filesystem -lboost_regex -lhdf5_hl -lhdf5"
        " -lopenblas -llmdb -lopencv_core -lopencv_imgproc -lopencv_imgcodecs -lopencv_highgui -lopencv_videoio")
patch("python/CMakeLists.txt", "add_library(pycaffe SHARED ${python_srcs} ${srcs})\n",
      "if(HAVE_CUDA)\n"
      "  caffe_cuda_compile(cuda_objs ${cuda})\n"
      "  list(APPEND srcs ${cuda_objs} ${cuda})\n"
      "endif()\n"
      "add_library(caffe SHARED ${srcs})\n"
      f"target_link_libraries(caffe proto {libs} ${{DEEPREBIRTH_CUDA_LIBS}})\n"
      "caffe_default_properties(caffe)\n"
      "add_library(pycaffe SHARED ${python_srcs})\n")
patch("python/CMakeLists.txt", "target_link_libraries(pycaffe proto ", "target_link_libraries(pycaffe caffe ")
patch("python/CMakeLists.txt", "-lboost_python ", f"-lboost_python{pytag} ")
patch("CMakeLists.txt", "# add_subdirectory(tools)", "add_subdirectory(tools)")

if flavour == "cuda":
    # The fork hard-codes CPU_ONLY and never looks for CUDA; put BVLC's Cuda.cmake back in.
    patch("CMakeLists.txt", "add_definitions( -DCPU_ONLY=1 )\n", "")
    (src / "cmake/Dependencies.cmake").write_text(
        (src / "cmake/Dependencies.cmake").read_text()
        + "\ninclude(cmake/Cuda.cmake)\n"
        "if(NOT HAVE_CUDA)\n  message(FATAL_ERROR \"CUDA requested but not found\")\nendif()\n"
        "list(REMOVE_ITEM Caffe_INCLUDE_DIRS PRIVATE PUBLIC)\ninclude_directories(${Caffe_INCLUDE_DIRS})\n"
        "set(DEEPREBIRTH_CUDA_LIBS ${CUDA_CUDART_LIBRARY} ${CUDA_curand_LIBRARY} ${CUDA_CUBLAS_LIBRARIES})\n")
PYEOF
patch_tools "$SRC"

PREFIX=$("$PY" -c 'import sys; print(sys.base_prefix)')
NUMPY_INC=$("$PY" -c 'import numpy; print(numpy.get_include())')
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
HDF5_CFLAGS=$(pkg-config --cflags hdf5-serial)
HDF5_LIBS=$(pkg-config --libs hdf5-serial)
# OpenCV 4 dropped the C constants (CV_LOAD_IMAGE_COLOR, CV_BGR2GRAY, CV_CAP_PROP_*, ...) that Caffe's sources use;
# their legacy headers still define them.
OPENCV_CFLAGS="-I/usr/include/opencv4 -include opencv2/imgproc/types_c.h -include opencv2/imgproc/imgproc_c.h
  -include opencv2/imgcodecs/legacy/constants_c.h -include opencv2/videoio/legacy/constants_c.h"
OPENCV_CFLAGS=$(echo $OPENCV_CFLAGS)
CMAKE_FLAVOUR_ARGS=(-DCPU_ONLY=ON)
if [ "$FLAVOUR" = cuda ]; then
    # Caffe's own arch table knows only old GPUs; ask nvcc what it can build (newest real arch + its PTX).
    ARCH=$(nvcc --list-gpu-arch 2>/dev/null | sed -n 's/^compute_//p' | sort -n | tail -1)
    CMAKE_FLAVOUR_ARGS=(-DCPU_ONLY=OFF -DUSE_CUDNN=OFF -DCUDA_ARCH_NAME=Manual -DCUDA_ARCH_BIN="${DEEPREBIRTH_CUDA_ARCH:-$ARCH}"
        -DCUDA_ARCH_PTX="${DEEPREBIRTH_CUDA_ARCH:-$ARCH}" -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT")
fi

mkdir -p "$SRC/build"
cd "$SRC/build"
log "configuring (cmake)"
cmake .. -DCMAKE_BUILD_TYPE=Release -DBUILD_python=ON -DBUILD_docs=OFF -DUSE_LMDB=ON -DUSE_OPENCV=ON \
    "${CMAKE_FLAVOUR_ARGS[@]}" \
    -DANACONDA_HOME="$PREFIX" -DPYTHON_VERSION="python$PYVER" \
    -DCMAKE_CXX_FLAGS="-I$NUMPY_INC -I$PY_INC $HDF5_CFLAGS -DUSE_LMDB -DUSE_OPENCV $OPENCV_CFLAGS" \
    -DCMAKE_SHARED_LINKER_FLAGS="$HDF5_LIBS" -DCMAKE_EXE_LINKER_FLAGS="$HDF5_LIBS" \
    > "$BUILD_ROOT/cmake.log" 2>&1 || { tail -30 "$BUILD_ROOT/cmake.log"; exit 1; }
log "compiling (make -j$(nproc)); log: $BUILD_ROOT/make.log"
# progress: one line per 10% of the build (a shell loop: mawk would buffer the stream until the end)
make -j"$(nproc)" 2>&1 | tee "$BUILD_ROOT/make.log" | {
    last=-1
    while IFS= read -r line; do
        if [[ $line =~ ^\[\ *([0-9]+)%\] ]] && (( BASH_REMATCH[1] / 10 != last )); then
            last=$(( BASH_REMATCH[1] / 10 ))
            log "${BASH_REMATCH[1]}% compiled"
        fi
    done
} || true
[ -f "$SRC/python/caffe/_caffe.so" ] && [ -x "$SRC/build/tools/caffe" ] \
    || { grep -m5 -B2 -A8 'error' "$BUILD_ROOT/make.log" | tail -40; log "build failed"; exit 1; }
touch "$STAMP"
link_into_venv
