"""Small helpers shared by the benchmark scripts in ``tools/analysis/``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import torch

__all__ = ['machine', 'timed', 'peak_memory_bytes', 'run_job']


def machine() -> str:
    """One line naming the CPU, threads, GPU and library versions, printed before any table."""
    import mmcv
    import mmengine
    import timm

    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
    return (
        f'{cpu}, {torch.get_num_threads()} threads, {gpu}; python {platform.python_version()}, '
        f'torch {torch.__version__}, timm {timm.__version__}, mmcv {mmcv.__version__}, '
        f'mmengine {mmengine.__version__}'
    )


def timed(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _status_bytes(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'no {field} in /proc/self/status')


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory ``fn()`` adds to what is already held: CUDA's allocator peak on a GPU, the
    process's peak resident set (reset to the current one first, Linux) on the CPU. Run it in a
    fresh process per measurement for CPU numbers that do not depend on earlier allocations."""
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak RSS to the current RSS
    before = _status_bytes('VmRSS:')
    fn()
    return _status_bytes('VmHWM:') - before


def run_job(script: str, job: dict) -> dict:
    """Runs ``script --job JSON`` in a fresh interpreter (``job['threads']`` OpenMP threads) and
    returns the JSON dict its last stdout line holds, or ``{'error': last stderr line}``."""
    result = subprocess.run(
        [sys.executable, script, '--job', json.dumps(job)],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS=str(job['threads'])),
    )
    if result.returncode != 0:
        return dict(error=((result.stderr.strip().splitlines() or ['failed'])[-1])[:120])
    return json.loads(result.stdout.strip().splitlines()[-1])
