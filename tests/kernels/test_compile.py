"""Every Triton kernel compiles for a CUDA target (sm_90), on any machine.

The CPU tests run the kernels under the interpreter, which accepts some programs the compiler rejects
(types, layouts, unsupported ops). ``bench/compile_kernels.py`` compiles each kernel through its real
launcher with the triton wheel's own ptxas — no GPU needed — so a compile-only break shows up here rather
than on the first GPU machine. It runs in a subprocess because triton must be imported without
``TRITON_INTERPRET`` for that. Cold, this takes about a minute on a small CPU; triton caches the results.
"""

import os
import subprocess
import sys

import pytest
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
KERNELS = [
    "_chunk_cumsum_fwd_kernel", "_chunk_cumsum_bwd_kernel", "_bmm_chunk_kernel", "_chunk_state_kernel",
    "_state_passing_fwd_kernel", "_state_passing_bwd_kernel", "_chunk_scan_fwd_kernel", "_chunk_scan_bwd_kernel",
    "_conv_fwd_kernel", "_conv_bwd_dpre_kernel", "_conv_bwd_dx_kernel", "_conv_update_kernel",
]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this triton build has no NVIDIA backend (no bundled ptxas)")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile_kernels.py"), "--sm", "90",
                          "--dtype", "bf16", "--shape", "1,512,8,64,2,64,128"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    missing = [k for k in KERNELS if k not in res.stdout]
    assert not missing, f"not compiled: {missing}\n{res.stdout}"
    assert "resource use unavailable" not in res.stdout, res.stdout
