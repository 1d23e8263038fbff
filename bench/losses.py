"""Peak memory and time of forward+backward of logit losses: naive vs chunked vs fused.

    python bench/losses.py                       # 8 x 1024 tokens, V = 49152, D = 576 (SmolLM2-like)
    python bench/losses.py --batch 2 --seq 256   # quicker

Setup (identical in every variant): last hidden state ``[B, T, D]`` fp32 (requires
grad), output head ``Linear(D, V)`` fp32, teacher logits ``[B, T, V]`` bf16 (as an
online bf16 teacher produces them), every token counted.

* naive:   ``logits = head(hidden)`` materialised ``[B*T, V]`` fp32, then the plain
  path (one autograd graph over all tokens), ``backward()``.
* chunked: the same materialised logits, loss computed ``--chunk`` tokens at a time
  (custom autograd Function; only the logits' own gradient buffer is ``[B*T, V]``).
* fused:   hidden state + head; logits computed ``--chunk`` tokens at a time and
  dropped; gradients of hidden and head accumulated chunk by chunk.

Method: each (term, variant) runs in a fresh Python subprocess. After the inputs
and the (zeroed) gradient buffers of hidden and head are allocated, the process
resets its peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets
``VmHWM``) and times one forward+backward (no warm-up, to keep the full-size run
to a few minutes; every variant pays its own first-touch page faults); "peak" is
``VmHWM - VmRSS`` measured just before the timed step, i.e. the extra resident
memory the loss step needed beyond its inputs and gradient buffers. Linux only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

VARIANTS = ("naive", "chunked", "fused")
TERMS = {"forward_kl": {}, "jsd": {"beta": 0.5}}


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def run_one(term: str, variant: str, batch: int, seq: int, vocab: int, dim: int, chunk: int, threads: int) -> dict:
    import stillroom.losses as L

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(batch, seq, dim, generator=g)).requires_grad_(True)
    head = torch.nn.Linear(dim, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=g) / dim**0.5)
    teacher = (torch.randn(batch, seq, vocab, generator=g) * 2).to(torch.bfloat16)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    terms = [L.make_logit_term(term, TERMS[term])]

    # Gradient buffers exist before the measurement (as in a training loop after step 1).
    hidden.grad = torch.zeros_like(hidden)
    head.weight.grad = torch.zeros_like(head.weight)

    def step() -> float:
        if variant == "fused":
            total, _, n = L.run_fused_logit_terms(terms, hidden, head, teacher, mask, chunk_tokens=chunk)
        else:
            logits = head(hidden)
            total, _, n = L.run_logit_terms(terms, logits, teacher, mask,
                                            chunk_tokens=None if variant == "naive" else chunk)
        (total / n).backward()
        return float(total) / n

    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    value = step()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    return {"term": term, "variant": variant, "seconds": seconds, "peak_bytes": peak, "loss_per_token": value,
            "grad_norm": float(hidden.grad.norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=1024, help="chunk_tokens of the chunked and fused variants")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--terms", default="forward_kl,jsd")
    ap.add_argument("--one", nargs=2, metavar=("TERM", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = (args.batch, args.seq, args.vocab, args.dim, args.chunk, args.threads)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], *shape)))
        return
    rows = []
    for term in args.terms.split(","):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--one", term, variant, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--vocab", str(args.vocab), "--dim", str(args.dim), "--chunk", str(args.chunk),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{term}/{variant} failed:\n{out.stderr}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  done {term:10s} {variant:8s} {rows[-1]['seconds']:.2f}s", file=sys.stderr)
    print(f"B x T = {args.batch} x {args.seq} tokens, V = {args.vocab}, D = {args.dim}, chunk_tokens = {args.chunk}, "
          f"torch threads = {args.threads}, torch {torch.__version__}\n")
    print("| term | variant | peak memory (MiB) | vs naive | forward+backward (s) | speed vs naive | loss/token | grad norm |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for term in args.terms.split(","):
        naive = next(r for r in rows if r["term"] == term and r["variant"] == "naive")
        for r in (r for r in rows if r["term"] == term):
            print(f"| {term} | {r['variant']} | {r['peak_bytes'] / 2**20:,.0f} | "
                  f"{r['peak_bytes'] / naive['peak_bytes']:.0%} | {r['seconds']:.2f} | "
                  f"{naive['seconds'] / r['seconds']:.2f}x | {r['loss_per_token']:.6f} | {r['grad_norm']:.6e} |")


if __name__ == "__main__":
    main()
