"""Register use and spills of the Triton MSDA kernels, compiled ahead of time (no GPU needed).

Compiles the forward and backward kernels at the DINO-4scale head shape (8 heads x 32
channels, 4 levels, 4 points) for the given CUDA architectures, with each kernel's default
(non-autotuned) block size, and prints what ``ptxas -v`` reports: registers, stack and spill
bytes. Spills are the first thing to look at when a kernel is slower than expected.

    python benchmarks/msda_registers.py --arch 80 90
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile

#: (kernel, BLOCK_Q, num_warps): the defaults of ``triton_backend`` without autotuning.
KERNELS = (("_msda_fwd_kernel", 64, 8), ("_msda_bwd_kernel", 32, 8))
#: pointer arguments that are not value-typed
INDEX_POINTERS = {"shapes_ptr", "start_ptr"}
FP32_POINTERS = {"loc_ptr", "weight_ptr", "grad_loc_ptr", "grad_weight_ptr"}


def _signature(arg_names: list[str], constexprs: dict[str, object], value_dtype: str) -> dict:
    sig = {}
    for name in arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INDEX_POINTERS:
            sig[name] = "*i64"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + value_dtype
        else:
            sig[name] = "i32"
    return sig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--points", type=int, default=4)
    args = parser.parse_args(argv)

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from detrkit.ops.msda import triton_backend

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    print(
        f"triton {triton.__version__}; date: {datetime.date.today().isoformat()}; "
        f"command: {' '.join(['python', *sys.argv])}"
    )
    print(
        f"{'arch':<7} {'kernel':<18} {'values':<6} {'BLOCK_Q':>7} {'warps':>5} "
        f"{'regs':>5} {'stack B':>7} {'spill st B':>10} {'spill ld B':>10}"
    )
    for arch in args.arch:
        for kernel, block_q, warps in KERNELS:
            fn = getattr(triton_backend, kernel).fn  # the jitted function under autotune
            names = list(fn.arg_names)
            block_c = triton.next_power_of_2(args.channels)
            constexprs = {
                "HEADS": args.heads,
                "C": args.channels,
                "L": args.levels,
                "P": args.points,
                "BLOCK_C": block_c,
                "EVEN_C": block_c == args.channels,
                "BLOCK_Q": block_q,
            }
            for dtype in ("fp32", "bf16"):
                # torch allocations are 16-byte aligned: Triton specialises on that at run time
                aligned = {
                    (i,): [["tt.divisibility", 16]]
                    for i, n in enumerate(names)
                    if n.endswith("_ptr")
                }
                source = ASTSource(
                    fn=fn,
                    signature=_signature(names, constexprs, dtype),
                    constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=aligned,
                )
                compiled = triton.compile(
                    source,
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": warps, "num_stages": 1},
                )
                with tempfile.TemporaryDirectory() as tmp:
                    ptx = os.path.join(tmp, "kernel.ptx")
                    with open(ptx, "w") as f:
                        f.write(compiled.asm["ptx"])
                    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
                    report = subprocess.run(
                        [
                            ptxas,
                            "-v",
                            f"--gpu-name={gpu}",
                            ptx,
                            "-o",
                            os.path.join(tmp, "kernel.cubin"),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stderr

                regs, stack, stores, loads = (
                    int(m.group(1)) if (m := re.search(pattern, report)) else 0
                    for pattern in (
                        r"Used (\d+) registers",
                        r"(\d+) bytes stack frame",
                        r"(\d+) bytes spill stores",
                        r"(\d+) bytes spill loads",
                    )
                )
                print(
                    f"sm_{arch:<4} {kernel.strip('_'):<18} {dtype:<6} {block_q:>7} {warps:>5} "
                    f"{regs:>5} {stack:>7} {stores:>10} {loads:>10}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
