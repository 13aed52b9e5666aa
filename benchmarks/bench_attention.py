"""Decode attention over cache storage: ``kvcompact.ops.decode_attention`` against its ceilings.

One decode step of one sequence (B = 1, Q = 1) per row, SmolLM2-135M-shaped (9 query heads over 3
KV heads, head_dim 64) and Llama-3.1-8B-shaped (32 over 8, head_dim 128), at several context
lengths, for model-dtype K/V and fp8_e4m3 / int8 codes with groups of 32. Each row reports:

* the op's median time and the bytes it must read (K and V as stored, plus their scales);
* ceiling 1, a ``copy_`` of the same bytes (a contiguous tensor of that size): achieved GB/s of the
  op against the copy's (read + write counted for the copy, read only for the op, as the op's
  output is tiny) -- the memory-speed limit;
* ceiling 2, the peer a user would otherwise run: ``torch.nn.functional.scaled_dot_product_attention``
  over dense K/V in the model dtype (for 8-bit storage: after ``ops.dequantize``, which is what a
  cache without this op pays every step; the dequantize is timed with it).

Ratios > 1 mean the op is faster. JSON with every row goes to ``--json``.

    python benchmarks/bench_attention.py [--device cuda] [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import machine_description, median_ms, print_table, write_json  # noqa: E402

from kvcompact import ops  # noqa: E402

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-3.1-8b": (32, 8, 128)}
FORMATS = (None, "fp8_e4m3", "int8")


def storage(shape, fmt, dtype, device, gen):
    k = torch.randn(shape, generator=gen).to(device)
    v = torch.randn(shape, generator=gen).to(device)
    if fmt is None:
        return k.to(dtype), v.to(dtype), None, None
    kc, ks = ops.quantize(k, fmt, 32)
    vc, vs = ops.quantize(v, fmt, 32)
    return kc, vc, ks, vs


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def run(device: str, contexts: list[int], dtype: torch.dtype, repeats: int) -> tuple[list[str], list[list]]:
    headers = ["model", "storage", "context", "op ms", "MB read", "op GB/s", "copy GB/s", "x copy",
               "sdpa ms", "x sdpa"]
    rows = []
    gen = torch.Generator().manual_seed(0)
    for model, (hq, hkv, d) in SHAPES.items():
        for t in contexts:
            for fmt in FORMATS:
                k, v, ks, vs = storage((1, hkv, t, d), fmt, dtype, device, gen)
                q = torch.randn(1, hq, 1, d, generator=gen).to(device, dtype)
                scale = d**-0.5
                op_ms = median_ms(lambda: ops.decode_attention(q, k, v, ks, vs, scale=scale), device, repeats)
                read = nbytes(k, v, ks, vs)
                src = torch.empty(read, dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                copy_ms = median_ms(lambda: dst.copy_(src), device, repeats)
                if fmt is None:
                    peer = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)  # noqa: E731
                else:
                    peer = lambda: F.scaled_dot_product_attention(  # noqa: E731
                        q, ops.dequantize(k, ks, dtype), ops.dequantize(v, vs, dtype), scale=scale, enable_gqa=True)
                sdpa_ms = median_ms(peer, device, repeats)
                op_gbs = read / op_ms / 1e6
                copy_gbs = 2 * read / copy_ms / 1e6
                rows.append([model, fmt or str(dtype).replace("torch.", ""), t, op_ms, read / 1e6, op_gbs, copy_gbs,
                             op_gbs / copy_gbs, sdpa_ms, sdpa_ms / op_ms])
                print(f"# {model} {fmt} {t}: {op_ms:.3f} ms", file=sys.stderr)
    return headers, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="contexts 1k and 4k (else 1k, 4k, 16k; CUDA adds 64k)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "attention.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    contexts = [1024, 4096] if args.quick else [1024, 4096, 16384] + ([65536] if args.device == "cuda" else [])
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    headers, rows = run(args.device, contexts, dtype, args.repeats)
    print(f"decode attention, B=1 Q=1, {machine_description(args.device)}; medians of {args.repeats}")
    print_table(headers, rows)
    write_json(args.json, "attention", args.device, headers, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
