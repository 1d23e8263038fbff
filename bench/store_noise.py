"""How far a store's teacher signal is from the dense teacher, per position, before any training: the squared error
``||p_hat - p||^2`` of the distribution a store row reads back (``p_hat``, over the whole vocabulary) against the
teacher's ``p``, for the store variants of bench/store_size.py.

Why this number: with forward KL (or soft CE) the gradient on the student's logits is ``q - p_hat`` (T = 1), so
``p_hat - p`` is exactly the error a store adds to every step's gradient at that position; a sampled signal's
``p_hat`` is unbiased, and its error is variance that the student partly fits (each position is seen ~4 times in
the 200-step study), which is what costs held-out KL. A top-k store's error is the tail it drops and is not
comparable here (its loss is on k + 1 bins, not on ``p_hat``): top-k variants are refused.

Two columns per variant, both over the same first ``--blocks`` training blocks:

* ``expected``: in closed form over the draws, given the store's (quantised, renormalised) head and tail mass
  ``m_hat``: the head's squared error, plus for ``d`` independent draws from the tail ``q = p_tail / m``:
  ``m_hat^2 (1 - sum q^2) / d`` (variance) ``+ (m_hat - m)^2 sum q^2`` (the tail mass's quantisation); a pure
  ``sampled`` store of k draws: ``(1 - sum p^2) / k``; allocated draws (``-alloc``) the same per position with
  its own count ``d_t`` (:func:`~stillroom.teachers.store_sampled.allocate_draws`). Systematic draws (``-sys``)
  have no closed form here: their ``expected`` column is the independent draws' (an upper bound up to the tail mass term).
* ``realised``: the rows the store really holds (:func:`row_signal` with the variant's draw seed, quantised as
  written, read back by :func:`loss_rows`), so ``realised - expected`` is this store's luck on these blocks.

    python bench/store_noise.py [--blocks 16] [--variants k8/int8+t16,k8/int4+t18,...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from stillroom.config.schema import DataConfig, DataSource, ModelSource
from stillroom.data import build_splits, collate
from stillroom.models import load_model
from stillroom.teachers.store_codes import LEVELS, decode_quantized, encode_logprobs
from stillroom.teachers.store_sampled import allocate_draws, loss_rows, row_signal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_size import draw_kind, draw_seed, parse_variant, tail_draws  # noqa: E402

DEFAULT = "k32/sampled,k4/int8+t22,k6/int8+t19,k8/int8+t16,k10/int8+t13,k12/int8+t10,k8/int4+t18,k12/int4+t13,k16/int4+t8"


def read_back(lp_nk: torch.Tensor, tail_n: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lp [n, k], tail [n])`` as a store of ``dtype`` reads them back: quantised (int8/int4 codes on float16
    row scales, or the 16-bit type), float16 tail, renormalised like
    :func:`~stillroom.teachers.store_format.decode_logprobs`."""
    if dtype in LEVELS:
        enc = encode_logprobs(lp_nk, dtype, "float16")
        enc["topk_ids"] = torch.zeros(lp_nk.shape, dtype=torch.int32)  # decode reads the width K from the ids
        lp_nk = decode_quantized(enc, 0, lp_nk.shape[0])
    else:
        lp_nk = lp_nk.to(getattr(torch, dtype)).float()
    tail_n = tail_n.half().float()
    total = torch.logsumexp(torch.cat([lp_nk, tail_n[:, None]], -1), -1)
    return lp_nk - total[:, None], tail_n - total


def head_and_tail(probs_nv: torch.Tensor, k: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lp_hat [n, k], ids [n, k], tail_hat [n])``: the top-k log-probs and tail as the store reads them back."""
    top_p, ids = probs_nv.topk(k, dim=-1)
    tail = (1 - top_p.double().sum(-1)).clamp_min(1e-30).log().float()
    lp, tail = read_back(top_p.log(), tail, dtype)
    return lp, ids, tail


def expected_error(probs_nv: torch.Tensor, variant: str) -> torch.Tensor:
    """``E ||p_hat - p||^2`` per position ``[n]`` over the draws (closed form; see the module docstring)."""
    p = probs_nv.double()
    sum_sq = (p * p).sum(-1)
    k, dtype, _ = parse_variant(variant)
    if dtype == "sampled":
        return (1 - sum_sq) / k
    d = tail_draws(variant)
    if not d:
        raise SystemExit(f"{variant}: a top-k store's error is its dropped tail; only drawn variants are measured")
    lp_hat, ids, tail_hat = head_and_tail(probs_nv, k, dtype)
    head = p.gather(-1, ids)
    m = (1 - head.sum(-1)).clamp_min(0)
    m_hat = tail_hat.double().exp()
    s = torch.where(m > 0, (sum_sq - (head * head).sum(-1)) / m.clamp_min(1e-30) ** 2, torch.zeros_like(m))
    head_err = ((lp_hat.double().exp() - head) ** 2).sum(-1)
    if draw_kind(variant) == "allocated":  # each position's own count, as the store writer shares them out
        d = allocate_draws(p.float().scatter(-1, ids, 0.0), p.shape[0] * d).double()
        return head_err + torch.where(d > 0, m_hat**2 * (1 - s) / d.clamp_min(1), 0.0) + (m_hat - m) ** 2 * s
    return head_err + m_hat**2 * (1 - s) / d + (m_hat - m) ** 2 * s


def realised_error(logits_tv: torch.Tensor, uid: str, variant: str) -> torch.Tensor:
    """``||p_hat - p||^2`` per position ``[T]`` of the row the variant's store holds for sequence ``uid``."""
    k, dtype, _ = parse_variant(variant)
    d = tail_draws(variant)
    signal = "sampled" if dtype == "sampled" else "topk_sampled"
    ids, lp, tail, extra = row_signal(logits_tv, uid, signal=signal, k=k, tail_draws=d, loss_temperature=1.0,
                                      draw=draw_kind(variant), draw_seed=draw_seed(variant))
    if signal == "topk_sampled":
        lp, tail = read_back(lp, tail, dtype)
    ids, lp, _ = loss_rows(signal, ids, lp, tail, extra.get("tail_ids"))
    p = torch.softmax(logits_tv.double(), -1)
    p_hat = torch.zeros_like(p).scatter_add_(-1, ids, lp.double().exp())
    return ((p_hat - p) ** 2).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=16, help="training blocks measured (the stores' first blocks)")
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    loaded = load_model(ModelSource(builtin="smollm2-135m-instruct"), dtype=torch.float32)
    tok, vocab = loaded.tokenizer, len(loaded.tokenizer)
    teacher = loaded.model.to(torch.bfloat16).eval()  # as bench/store_size.py's stores (bf16 teacher)
    train = build_splits(DataConfig(sources=[DataSource(bundled="pydoc")], seq_len=args.seq), tok, 0).train
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    exp = {v: [] for v in variants}
    real = {v: [] for v in variants}
    with torch.no_grad():
        for lo in range(0, args.blocks, 4):
            chunk = train[lo : min(lo + 4, args.blocks)]
            logits = teacher(**collate(chunk, tok.pad_token_id).model_inputs(), use_cache=False).logits[..., :vocab]
            for b, ex in enumerate(chunk):
                lg = logits[b, : len(ex.input_ids)].float()
                probs = torch.softmax(lg, -1)
                for v in variants:
                    exp[v].append(expected_error(probs, v))
                    real[v].append(realised_error(lg, ex.uid, v))
    n = sum(len(e.input_ids) for e in train[: args.blocks])
    print(f"{args.blocks} blocks, {n} positions; squared error ||p_hat - p||^2 per position (x 1e-3)\n")
    print("| variant | expected, mean | expected, median | realised (draw seed), mean |\n|---|---:|---:|---:|")
    for v in variants:
        e, r = torch.cat(exp[v]), torch.cat(real[v])
        print(f"| {v} | {1e3 * e.mean():.2f} | {1e3 * e.median():.2f} | {1e3 * r.mean():.2f} |")


if __name__ == "__main__":
    main()
