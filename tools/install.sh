#!/usr/bin/env bash
# One-command install of effvision into .venv (called by `make install`).
#
# Installs the newest torch from the registry, the pinned OpenMMLab stack, and mmcv 2.1.0 built from
# its sdist with compiled ops. mmcv 2.1.0 cannot be pip-installed as is on current torch: its
# setup.py imports pkg_resources (gone from new setuptools under build isolation) and hard-codes a
# C++ standard older than the one torch >= 2.13 headers need. We build it ourselves, without build
# isolation, with an older setuptools and the standard raised, and cache the wheel outside the repo.
#
# Environment:
#   PYTHON           interpreter to create the venv with (default: python3.11, else python3)
#   VENV             venv path (default: .venv)
#   EFFVISION_CACHE  cache root (default: ~/.cache/effvision); wheels go to $EFFVISION_CACHE/wheels
#   FORCE_CUDA=1     build mmcv's CUDA ops even though torch sees no GPU (slow: ~1 h)
#   EFFVISION_WITH_CUDA=0  build effvision's own kernels for the CPU only (default: CUDA too,
#                    when torch is a CUDA build and nvcc is found; see setup.py)
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
CACHE=${EFFVISION_CACHE:-$HOME/.cache/effvision}
WHEELS="$CACHE/wheels"
MMCV_VERSION=2.1.0
STAMP="$VENV/.effvision-install"

say() { printf '\033[1m[install %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*"; }

# Re-run only when an input of the install changed.
fingerprint=$(cat tools/install.sh requirements/*.txt setup.py pyproject.toml effvision/ops/csrc/* 2>/dev/null | sha256sum | cut -c1-16)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$fingerprint" ]]; then
    say "up to date ($VENV)"
    exit 0
fi
t_start=$SECONDS

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
# ninja: without it torch's extension builder compiles mmcv's 77 sources one at a time
"${PIP[@]}" install -q --upgrade pip wheel ninja
export PATH="$PWD/$VENV/bin:$PATH"

say "installing torch and runtime dependencies (first time: several GB of CUDA wheels)"
"${PIP[@]}" install -q -r requirements/runtime.txt -r requirements/export.txt -r requirements/tests.txt

# --- mmcv 2.1.0 with compiled ops -------------------------------------------------------------
read -r torch_version cuda_tag want_cuda cxx_std < <("$PY" - <<'PY'
import os
import torch
from packaging.version import Version
v = Version(torch.__version__.split('+')[0])
cuda = torch.version.cuda or 'none'
want_cuda = torch.cuda.is_available() or os.environ.get('FORCE_CUDA', '0') == '1'
# torch >= 2.13 headers use C++20 features; older releases need C++17.
std = 'c++20' if v >= Version('2.13') else 'c++17'
print(v, 'cu' + cuda.replace('.', '') if cuda != 'none' else 'cpu', int(want_cuda), std)
PY
)
pytag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
ops=$([[ $want_cuda == 1 ]] && echo "cudaops" || echo "cpuops")
key="mmcv-$MMCV_VERSION-$pytag-torch$torch_version-$cuda_tag-$ops"
cached="$WHEELS/$key"
if ! "$PY" -c "import mmcv, mmcv._ext; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null; then
    if ! ls "$cached"/mmcv-*.whl >/dev/null 2>&1; then
        say "building mmcv $MMCV_VERSION with $ops for torch $torch_version ($cxx_std);" \
            "this takes about 16 minutes on 2 cores, once: the wheel is cached in $cached"
        build=$(mktemp -d)
        trap 'rm -rf "$build"' EXIT
        # mmcv's setup.py imports pkg_resources, which setuptools >= 82 no longer has, and torch
        # requires setuptools >= 77 in the venv. So the build alone sees an older setuptools, put
        # first on its path; the venv keeps torch's.
        "${PIP[@]}" install -q --no-warn-conflicts --target "$build/setuptools" \
            'setuptools<70'
        export PYTHONPATH="$build/setuptools${PYTHONPATH:+:$PYTHONPATH}"
        "${PIP[@]}" download -q --no-deps --no-binary mmcv --no-build-isolation \
            -d "$build" "mmcv==$MMCV_VERSION"
        tar -xzf "$build"/mmcv-$MMCV_VERSION.tar.gz -C "$build"
        src="$build/mmcv-$MMCV_VERSION"
        # mmcv's setup.py pins -std=c++14/17 for both host and nvcc; current torch needs $cxx_std.
        sed -i -E "s/-std=c\+\+1[47]/-std=$cxx_std/g" "$src/setup.py"
        grep -q -- "-std=$cxx_std" "$src/setup.py" || { echo "could not set the C++ standard in mmcv's setup.py" >&2; exit 1; }
        export MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
        [[ $want_cuda == 1 ]] && export FORCE_CUDA=1 || export FORCE_CUDA=0
        t_mmcv=$SECONDS
        "${PIP[@]}" wheel --no-deps --no-build-isolation -w "$build/dist" "$src" \
            > "$build/mmcv-build.log" 2>&1 || { tail -50 "$build/mmcv-build.log" >&2; exit 1; }
        unset PYTHONPATH
        mkdir -p "$cached.tmp" && cp "$build"/dist/mmcv-*.whl "$cached.tmp"/ && mv "$cached.tmp" "$cached"
        say "mmcv built in $((SECONDS - t_mmcv)) s"
    else
        say "using cached mmcv wheel $cached"
    fi
    "${PIP[@]}" install -q --no-deps --force-reinstall "$cached"/mmcv-*.whl
fi

say "installing mmengine, mmsegmentation, mmdet (--no-deps: keeps opencv headless)"
"${PIP[@]}" install -q --no-deps -r requirements/openmmlab.txt
# --- effvision and its kernels -----------------------------------------------------------------
# The fused ops (effvision/ops/csrc) compile against the installed torch: C++ always, CUDA when
# torch is a CUDA build and a toolkit is found. torch finds the toolkit through CUDA_HOME: we set it
# to the root that holds lib64/libcudart (torch's own guess from nvcc's path can be wrong), and,
# without a GPU to detect, compile for Hopper only (a compile check; a GPU machine builds for its
# own architecture).
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
    for root in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")" /usr/local/cuda; do
        if ls "$root"/lib64/libcudart.so* >/dev/null 2>&1; then export CUDA_HOME="$root"; break; fi
    done
fi
if [[ -n "${CUDA_HOME:-}" && -z "${TORCH_CUDA_ARCH_LIST:-}" ]] \
    && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    export TORCH_CUDA_ARCH_LIST="9.0"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
say "installing effvision (editable) and compiling its kernels" \
    "(CUDA_HOME=${CUDA_HOME:-none}, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-auto}; a few minutes)"
t_ops=$SECONDS
log=$(mktemp)
"${PIP[@]}" install -v --no-deps --no-build-isolation -e . > "$log" 2>&1 \
    || { tail -60 "$log" >&2; echo "effvision's kernels failed to build (full log: $log)" >&2; exit 1; }
rm -f "$log"
say "effvision installed in $((SECONDS - t_ops)) s"

"$PY" - <<'PY'
import mmcv, mmcv.ops, mmdet, mmengine, mmseg, torch  # noqa: F401
from mmcv.ops import nms  # proves the compiled mmcv._ext loads
import effvision
from effvision.ops import _ext
built = {op: ('cpu+cuda' if _ext.has_cuda(op) else 'cpu') if _ext.load(op) else 'MISSING'
         for op in ('window_attention', 'routing_attention')}
assert all(v != 'MISSING' for v in built.values()), f'compiled ops missing: {built}'
print('effvision ops:', ', '.join(f'{k} ({v})' for k, v in built.items()))
print(f'torch {torch.__version__}  mmengine {mmengine.__version__}  mmcv {mmcv.__version__} (ops)  '
      f'mmseg {mmseg.__version__}  mmdet {mmdet.__version__}  effvision {effvision.__version__}')
PY
echo "$fingerprint" > "$STAMP"
say "done in $((SECONDS - t_start)) s"
