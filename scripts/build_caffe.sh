#!/usr/bin/env bash
# Build real Caffe (CPU only) + pycaffe from the PyPI sdist brocolli-caffe==9.0.2 into a cache folder
# outside the checkout, and link it into a virtualenv.
#
#   scripts/build_caffe.sh VENV_PYTHON
#
# The build is keyed by the sdist version and the interpreter's version, so a second run finds the finished
# build and only relinks it (seconds). Set DEEPREBIRTH_CACHE to move the cache (default ~/.cache/deeprebirth).
set -euo pipefail

PY=${1:?usage: build_caffe.sh VENV_PYTHON}
case "$PY" in /*) ;; *) PY="$PWD/$PY" ;; esac  # the build cd's elsewhere
SDIST_VERSION=9.0.2
CACHE=${DEEPREBIRTH_CACHE:-$HOME/.cache/deeprebirth}
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYTAG=${PYVER/./}
NPMAJOR=$("$PY" -c 'import numpy; print(numpy.__version__.split(".")[0])')
BUILD_ROOT="$CACHE/caffe-brocolli-$SDIST_VERSION-py$PYTAG-np$NPMAJOR"
SRC="$BUILD_ROOT/src"
STAMP="$BUILD_ROOT/.built"

log() { printf '[build_caffe] %s\n' "$*" >&2; }

APT_PACKAGES="build-essential cmake pkg-config libboost-system-dev libboost-thread-dev libboost-filesystem-dev
  libboost-python-dev libboost-regex-dev libgtest-dev libprotobuf-dev protobuf-compiler libgoogle-glog-dev
  libgflags-dev libhdf5-dev libopenblas-dev graphviz"

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
    local site
    site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$SRC/python" > "$site/deeprebirth_pycaffe.pth"
    GLOG_minloglevel=2 "$PY" -c 'import caffe; caffe.set_mode_cpu()' \
        || { log "pycaffe does not import from $PY"; exit 1; }
    log "pycaffe linked into $site (build: $BUILD_ROOT)"
}

install_apt_packages

if [ -f "$STAMP" ]; then
    log "cached build found"
    link_into_venv
    exit 0
fi

log "building Caffe from brocolli-caffe==$SDIST_VERSION into $BUILD_ROOT (about 4 minutes on 2 cores)"
rm -rf "$BUILD_ROOT"
mkdir -p "$BUILD_ROOT/download"
"$PY" -m pip download --quiet --no-deps --no-binary :all: "brocolli-caffe==$SDIST_VERSION" -d "$BUILD_ROOT/download"
mkdir -p "$SRC"
tar xzf "$BUILD_ROOT/download/brocolli-caffe-$SDIST_VERSION.tar.gz" -C "$SRC" --strip-components=1

# Debian ships only the versioned boost_python library (libboost_python311.so).
sed -i "s/-lboost_python /-lboost_python$PYTAG /" "$SRC/python/CMakeLists.txt"
# python/caffe/io.py imports scikit-image and scipy at the top; only its image helpers use them.
"$PY" - "$SRC/python/caffe/io.py" <<'PYEOF'
import re, sys
path = sys.argv[1]
text = open(path).read()
text = text.replace("import skimage.io\nfrom scipy.ndimage import zoom\n", "")
text = text.replace("def load_image(", "def load_image(", 1)
for func in ("load_image", "resize_image"):
    text = re.sub(r"(def %s\([^)]*\):\n(?:    \"\"\"[\s\S]*?\"\"\"\n)?)" % func,
                  lambda m: m.group(1) + "    import skimage.io\n    from scipy.ndimage import zoom\n", text, count=1)
open(path, "w").write(text)
PYEOF

PREFIX=$("$PY" -c 'import sys; print(sys.base_prefix)')
NUMPY_INC=$("$PY" -c 'import numpy; print(numpy.get_include())')
PY_INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
HDF5_FLAGS=$(pkg-config --cflags --libs hdf5-serial)
HDF5_CFLAGS=$(pkg-config --cflags hdf5-serial)
HDF5_LIBS=$(pkg-config --libs hdf5-serial)

mkdir -p "$SRC/build"
cd "$SRC/build"
log "configuring (cmake)"
cmake .. -DCMAKE_BUILD_TYPE=Release -DCPU_ONLY=ON -DBUILD_python=ON -DBUILD_docs=OFF \
    -DANACONDA_HOME="$PREFIX" -DPYTHON_VERSION="python$PYVER" \
    -DCMAKE_CXX_FLAGS="-I$NUMPY_INC -I$PY_INC $HDF5_CFLAGS" \
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
[ -f "$SRC/python/caffe/_caffe.so" ] || { tail -40 "$BUILD_ROOT/make.log"; log "build failed"; exit 1; }
touch "$STAMP"
link_into_venv
