"""Quantize/dequantize speed: kvcompact vs torch eager (same contract) vs a plain copy.

CPU: median ms of the fused kernel, of kvcompact.reference (torch eager doing
the same math in several passes) and of ``copy_`` of the input (the memory
ceiling), with the ratios. CUDA: GB/s (bytes read + written) beside a
device-to-device copy of the same bytes. ``quantize`` / ``dequantize`` allocate
their outputs (a fresh 32 MiB bf16 output is mmapped and page-faulted on every
call, which ``copy_`` into an existing tensor does not pay); the ``_into_`` rows
time the kernels alone, writing preallocated buffers as a cache does.

    python benchmarks/bench_quantize.py [--quick] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_description, median_ms, print_table, write_json  # noqa: E402

import kvcompact  # noqa: E402
from kvcompact import ops, reference  # noqa: E402

SHAPES = [(1, 8, 16384, 128), (1, 8, 4096, 128), (1, 32, 1024, 128), (4, 8, 257, 64)]
CODE_BYTES = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="largest shape only, fewer repeats")
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 makes every row comparable on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    out = args.out or os.path.join(os.path.dirname(__file__), "out", f"bench_quantize_{device}.json")
    shapes = SHAPES[:1] if args.quick else SHAPES
    repeats = 5 if args.quick else 9
    print(f"# bench_quantize on {machine_description(device)}")

    headers = (
        ["op", "shape", "fmt", "group", "kvcompact ms", "eager ms", "x eager", "copy ms", "copy/kvc"]
        if device == "cpu"
        else ["op", "shape", "fmt", "group", "kvcompact ms", "GB/s", "copy GB/s", "% of copy", "eager ms"]
    )
    rows = []
    for shape in shapes:
        x = torch.randn(shape, dtype=torch.bfloat16, device=device)
        for fmt in kvcompact.FORMATS:
            for group in (None, 32):
                g = group or shape[-1]
                codes, scales = ops.quantize(x, fmt, group)
                # quantize: read bf16, write codes + scales; dequantize: the reverse.
                q_bytes = x.numel() * 2 + codes.numel() * CODE_BYTES + scales.numel() * 4
                if device == "cpu":
                    # The CPU ceiling: a plain copy_ of the input.
                    x_copy = torch.empty_like(x)
                    t_copy = median_ms(lambda: x_copy.copy_(x), device, repeats)
                else:
                    # A device copy of q_bytes / 2 bytes reads and writes q_bytes in all.
                    src = torch.ones(q_bytes // 4, dtype=torch.bfloat16, device=device)
                    dst = torch.empty_like(src)
                    t_copy = median_ms(lambda: dst.copy_(src), device, repeats)
                out = torch.empty_like(x)
                cases = [
                    ("quantize", lambda: ops.quantize(x, fmt, group), lambda: reference.quantize(x, fmt, group)),
                    ("dequantize", lambda: ops.dequantize(codes, scales, torch.bfloat16),
                     lambda: reference.dequantize(codes, scales, torch.bfloat16)),
                    # The kernels alone, into preallocated buffers (a cache append, the workspace).
                    ("quantize_into_", lambda: ops.quantize_into_(x, codes, scales, fmt),
                     lambda: reference.quantize(x, fmt, group)),
                    ("dequantize_into_", lambda: ops.dequantize_into_(codes, scales, out),
                     lambda: reference.dequantize(codes, scales, torch.bfloat16)),
                ]
                for name, fused, eager in cases:
                    t_k = median_ms(fused, device, repeats)
                    t_e = median_ms(eager, device, max(3, repeats // 2))
                    label = "x".join(map(str, shape))
                    if device == "cpu":
                        rows.append([name, label, fmt, g, t_k, t_e, t_e / t_k, t_copy, t_copy / t_k])
                    else:
                        gbs = q_bytes / t_k / 1e6
                        copy_gbs = q_bytes / t_copy / 1e6
                        rows.append([name, label, fmt, g, t_k, gbs, copy_gbs, 100 * gbs / copy_gbs, t_e])
    print_table(headers, rows)
    write_json(out, "bench_quantize", device, headers, rows)


if __name__ == "__main__":
    main()
