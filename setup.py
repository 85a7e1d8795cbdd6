"""Builds the effvision package and its compiled ops.

Each fused op in ``effvision/ops/csrc`` becomes its own extension module ``effvision.ops._<op>``:
the C++ CPU kernel always, plus the CUDA kernel when torch is a CUDA build and a CUDA toolkit is
found (``CUDA_HOME``; without a GPU to detect, set ``TORCH_CUDA_ARCH_LIST``). Environment:

* ``EFFVISION_BUILD_OPS=0`` skips the compiled ops (effvision then runs the PyTorch references);
  a comma-separated list of op names builds only those.
* ``EFFVISION_WITH_CUDA=0`` builds the CPU kernels only; ``=1`` fails if CUDA cannot be built.

Install it with ``pip install --no-build-isolation -e .`` (the build needs the installed torch).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = Path('effvision', 'ops', 'csrc')
OPS = ('window_attention', 'routing_attention')


def read_version() -> str:
    namespace: dict = {}
    exec((ROOT / 'effvision' / 'version.py').read_text(), namespace)
    return namespace['__version__']


def extensions() -> tuple[list, dict]:
    wanted = os.environ.get('EFFVISION_BUILD_OPS', '1')
    if wanted == '0':
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    names = OPS if wanted == '1' else tuple(n.strip() for n in wanted.split(',') if n.strip())
    cuda_wish = os.environ.get('EFFVISION_WITH_CUDA', 'auto')
    with_cuda = cuda_wish != '0' and torch.version.cuda is not None and CUDA_HOME is not None
    if cuda_wish == '1' and not with_cuda:
        raise RuntimeError(
            'EFFVISION_WITH_CUDA=1 but CUDA cannot be built: torch '
            f'{torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}'
        )
    cxx = ['-O3', '-fopenmp', '-DEFFVISION_OPS_BUILD']
    nvcc = ['-O3', '--use_fast_math', '-lineinfo', '--expt-relaxed-constexpr']
    modules = []
    for name in names:
        if name not in OPS:
            raise RuntimeError(f'EFFVISION_BUILD_OPS: unknown op {name!r}; known: {OPS}')
        sources = [str(CSRC / f'{name}.cpp')]
        if not (ROOT / sources[0]).exists():
            continue
        kwargs = dict(
            name=f'effvision.ops._{name}',
            sources=sources,
            include_dirs=[str(ROOT / CSRC)],
            extra_compile_args={'cxx': cxx},
            extra_link_args=['-fopenmp'],
        )
        cuda_source = CSRC / f'{name}_cuda.cu'
        if with_cuda and (ROOT / cuda_source).exists():
            sources.append(str(cuda_source))
            kwargs['extra_compile_args'] = {
                'cxx': [*cxx, '-DEFFVISION_WITH_CUDA'],
                'nvcc': [*nvcc, '-DEFFVISION_WITH_CUDA'],
            }
            modules.append(CUDAExtension(**kwargs))
        else:
            modules.append(CppExtension(**kwargs))
    return modules, {'build_ext': BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(
    name='effvision',
    version=read_version(),
    description='Efficient vision transformers and decoders for dense prediction on OpenMMLab 2.x',
    packages=find_packages(include=['effvision', 'effvision.*']),
    python_requires='>=3.10',
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
