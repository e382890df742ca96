"""Compile every Triton kernel of ``kernels/`` for a CUDA target *without a GPU*, and report register and
spill use per kernel — a check that the compiled path builds (the CPU tests run the interpreter, which
accepts some programs the compiler rejects) and a first performance proxy where no GPU is available.

The kernels are compiled through their real launchers: each ``@triton.jit`` kernel is swapped for a
recorder that turns the launch arguments into a signature, compiles it with ``triton.compile`` for the
target (ptxas from the triton wheel), and reads the cubin's resource use with the wheel's ``cuobjdump``.
Nothing is executed.

    python bench/compile_kernels.py                 # sm_90, shapes of the Nemotron-H 8B / Nano mixer
    python bench/compile_kernels.py --sm 80 --dtype fp32

Run it with ``TRITON_INTERPRET`` unset (the script removes it before importing triton).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # must precede the first triton import
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32"}


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` compiles instead of launching."""

    def __init__(self, fn, target, seen):
        self.fn, self.target, self.seen = fn, target, seen

    def __getitem__(self, grid):
        return self._compile

    def _compile(self, *args, **kw):
        fn = self.fn
        opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
        vals = dict(zip(fn.arg_names, args), **kw)
        sig, consts = {}, {}
        for param, name in zip(fn.params, fn.arg_names):
            v = vals[name]
            if param.is_constexpr:
                sig[name], consts[name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[name] = "*" + _TY[v.dtype]
            elif isinstance(v, bool):
                sig[name] = "i1"
            elif isinstance(v, int):
                sig[name] = "i32" if abs(v) < 2**31 else "i64"
            elif isinstance(v, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: argument {name} of type {type(v)}")
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())), str(opts))
        if key in self.seen:
            return
        self.seen.add(key)
        compiled = triton.compile(ASTSource(fn, sig, consts), target=self.target, options=opts)
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
        os.unlink(f.name)
        usage = next((line.strip() for line in res.stdout.splitlines() if "REG" in line), "resource use unavailable")
        usage = " ".join(w for w in usage.split() if w.split(":")[0] in ("REG", "STACK", "SHARED"))
        blocks = {k: v for k, v in consts.items() if k.startswith("BLOCK") or k in ("MODE", "DOT_PREC", "COLUMNS")}
        print(f"{fn.__name__:28s} {usage:32s} warps={opts.get('num_warps', 4):<3d} {blocks}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sm", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--shape", default="1,8192,64,64,8,128,128", help="SSD b,l,h,p,g,n,chunk")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    target = GPUTarget("cuda", args.sm, 32)

    import tandem.kernels.conv1d.conv1d_triton as conv_mod
    import tandem.kernels.ssd.bmm_chunk as bmm_mod
    import tandem.kernels.ssd.chunk_cumsum as cumsum_mod
    import tandem.kernels.ssd.chunk_output as output_mod
    import tandem.kernels.ssd.chunk_state as state_mod

    conv_mod.check_launchable = lambda *a, **k: None  # CPU tensors stand in for CUDA ones; nothing is launched
    seen: set = set()
    for mod in (cumsum_mod, state_mod, bmm_mod, output_mod, conv_mod):
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                setattr(mod, name, _Recorder(obj, target, seen))

    from tandem.kernels.conv1d.conv1d_triton import _conv_bwd, _conv_fwd, causal_conv1d_update_triton
    from tandem.kernels.ssd.ssd_triton import _SSDChunkScan, _ssd_fwd

    b, l, h, p, g, n, Q = (int(v) for v in args.shape.split(","))
    print(f"target sm_{args.sm}, {args.dtype}, SSD shape b,l,h,p,g,n,chunk = {(b, l, h, p, g, n, Q)}")
    # Tensors are allocated (on CPU, never read): the launchers need shapes, strides and dtypes only.
    x = torch.empty(b, l, h, p, dtype=dtype)
    dt = torch.empty(b, l, h, dtype=dtype)
    A, D, dt_bias = torch.empty(h), torch.empty(h), torch.empty(h)
    B = torch.empty(b, l, g, n, dtype=dtype)
    seq = torch.zeros(b, l, dtype=torch.int32)
    init = torch.zeros(b, h, p, n)
    y, final, dtp, cs, S_in = _ssd_fwd(x, dt, A, B, B, Q, D, dt_bias, True, (0.0, float("inf")), seq, init)

    class _Ctx:
        saved_tensors = (x, dt, A, B, B, D, dt_bias, seq, dtp, cs, S_in)
        cfg = (Q, True, (0.0, float("inf")), True, torch.float32)

    _SSDChunkScan.backward(_Ctx, torch.empty_like(y), torch.empty_like(final))
    d = h * p + 2 * g * n  # the mixer's conv channels (x | B | C)
    xc, w = torch.empty(b, l, d, dtype=dtype), torch.empty(d, 4)
    _conv_fwd(xc, w, torch.empty(d), seq, None, True)
    _conv_bwd(xc, xc, w, torch.empty(d), seq, None, True)
    with torch.no_grad():
        causal_conv1d_update_triton(xc[:, 0], torch.empty(b, d, 3, dtype=dtype), w, torch.empty(d), "silu")
    print(f"{len(seen)} kernel specialisations compiled")


if __name__ == "__main__":
    main()
