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
fingerprint=$(cat tools/install.sh requirements/*.txt setup.py pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
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
say "installing effvision (editable)"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .

"$PY" - <<'PY'
import mmcv, mmcv.ops, mmdet, mmengine, mmseg, torch  # noqa: F401
from mmcv.ops import nms  # proves the compiled mmcv._ext loads
import effvision
print(f'torch {torch.__version__}  mmengine {mmengine.__version__}  mmcv {mmcv.__version__} (ops)  '
      f'mmseg {mmseg.__version__}  mmdet {mmdet.__version__}  effvision {effvision.__version__}')
PY
echo "$fingerprint" > "$STAMP"
say "done in $((SECONDS - t_start)) s"
