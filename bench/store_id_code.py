"""What ``teacher.store.id_code: ranked`` costs in time: encoding and decoding one full-size shard's ids.

A shard of the default size holds 262,144 positions. The reader decodes a ranked shard whole when it loads it (and
again only if its cache evicted it), so the decode time per shard is the price a run pays per shard load; the
encode time is paid once, when ``cache-teacher`` writes the shard. The ids here are drawn from a Zipf law over
SmolLM2's 49,152 tokens (exponent ``--zipf``), in the two shapes the study stores use: the default top-64 store
(``topk_ids [N, 64]``) and the top 8 + 16 tail draws (``topk_ids [N, 8]``, ``tail_ids [N, 16]``). Sizes on real
teacher ids come from bench/store_size.py's ``-ranked`` variants (docs/BENCHMARKS.md).

    python bench/store_id_code.py [--positions 262144] [--zipf 1.1] [--reps 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from stillroom.teachers.store_ids import decode_ids, encode_ids

V = 49152


def zipf_ids(shape: tuple[int, ...], exponent: float, rng: np.random.Generator) -> torch.Tensor:
    p = 1.0 / np.arange(1, V + 1) ** exponent
    ids = rng.permutation(V)[rng.choice(V, size=int(np.prod(shape)), p=p / p.sum())]
    return torch.from_numpy(ids.reshape(shape)).to(torch.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=262144)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.positions
    shapes = {"top-64": {"topk_ids": (n, 64)}, "top-8 + 16 draws": {"topk_ids": (n, 8), "tail_ids": (n, 16)}}
    print(f"{n} positions, Zipf {args.zipf} over V = {V}, {torch.get_num_threads()} threads; best of {args.reps}\n")
    print("| shard | ids | plain MB | ranked MB | bits per id | encode s | decode s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, spec in shapes.items():
        plain = {k: zipf_ids(shape, args.zipf, rng) for k, shape in spec.items()}
        ids = sum(t.numel() for t in plain.values())
        enc, dec = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            coded = encode_ids(plain, V)
            t1 = time.perf_counter()
            back = decode_ids(coded, torch.uint16)
            dec.append(time.perf_counter() - t1)
            enc.append(t1 - t0)
        assert all(torch.equal(back[k], plain[k]) for k in plain)
        coded_bytes = sum(t.numel() * t.element_size() for t in coded.values())
        print(f"| {name} | {ids:,} | {2 * ids / 1e6:.1f} | {coded_bytes / 1e6:.1f} | {8 * coded_bytes / ids:.2f} | "
              f"{min(enc):.2f} | {min(dec):.2f} |")


if __name__ == "__main__":
    main()
