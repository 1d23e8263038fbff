"""Peak memory and step time of one distillation step with a 256k-vocabulary teacher, same and cross tokenizer.

    python bench/big_vocab.py                    # 4 x 128 tokens, teacher vocabulary 256,000
    python bench/big_vocab.py --vocab 65536      # smaller

Teachers with Gemma- or Qwen-class vocabularies (256k) make the logits, not the weights, the memory problem:
``[4, 128, 256k]`` is 512 MiB in fp32 for each copy. One training step (teacher signal, student forward, loss,
backward, AdamW step) of stillroom's own pieces (:class:`~stillroom.teachers.signal.OnlineTeacher` or
:class:`~stillroom.teachers.cross.CrossTeacher`, ``StudentForward``, ``LossMix``) is measured for:

* ``same, naive``: teacher and student share the 256k vocabulary; student logits materialised (``loss.fused:
  false``) and the loss in one chunk of every token;
* ``same, fused``: the same with ``loss.fused: true``, ``chunk_tokens: 128`` (student logits 128 rows at a time);
* ``cross, fused``: the student has its own 8k-class byte-level BPE (``teacher.tokenizer_mode: cross``): the
  teacher's logits exist only ``teacher.cross.chunk_rows`` aligned rows at a time and are reduced at once to
  the matched tokens and ranked probabilities (loss: CE + forward KL on matched tokens + ULD on the rest).

Models: teacher a random Llama (2 layers, d 256, bf16 weights as ``teacher.dtype: auto`` picks on fast-bf16
CPUs); students 1 layer, d 128, fp32 master weights, fp32 math. Tokenizers: the teacher's is a byte-level BPE
trained on pydoc prose, padded to the vocabulary size with entries no merge produces (its vocabulary and
output head are 256k; only the trained part occurs in text). Each variant runs in a fresh subprocess: after
the setup and one warm-up step it resets its peak-RSS counter (``/proc/self/clear_refs``) and runs 3 steps;
"peak" is ``VmHWM`` minus the RSS before those steps (Linux only). Time: the median step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("same, naive", "same, fused", "cross, fused", "same, held-out eval")
"""The last one is no training step: the report's held-out evaluation (``evaluate_lm``: the student's and the
teacher's full logits of one batch, CE, KL and agreement), to see whether evaluation peaks above training."""


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _bpe(vocab: int, pad_to: int | None, specials: list[str]):
    """A byte-level BPE trained on pydoc prose to ``vocab`` tokens, padded to ``pad_to`` with unreachable entries."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([v for _, v in sorted(topics.items())], trainer=trainer)
    if pad_to:
        spec = json.loads(bpe.to_str())
        table = spec["model"]["vocab"]
        while len(table) < pad_to:
            table[f"<unused{len(table)}>"] = len(table)
        bpe = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=specials[1], pad_token=specials[0])


def _llama(vocab: int, layers: int, hidden: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype)


def run_one(variant: str, batch: int, seq: int, vocab: int, threads: int) -> dict:
    from pydoc_data.topics import topics

    from stillroom.config.core import LossConfig
    from stillroom.data.batch import Example, collate
    from stillroom.domains.lm.forward import StudentForward
    from stillroom.losses import LossMix, StudentOutput
    from stillroom.teachers.cross import CrossTeacher
    from stillroom.teachers.cross_align import cross_vocab
    from stillroom.teachers.signal import OnlineTeacher

    torch.set_num_threads(threads)
    cross = variant.startswith("cross")
    teacher_tok = _bpe(8000, vocab, ["<|pad|>", "<|eos|>"])
    student_tok = _bpe(8192, None, ["<pad>", "<eos>"]) if cross else teacher_tok
    teacher = _llama(vocab, 2, 256, torch.bfloat16).eval()
    student = _llama(len(student_tok), 1, 128, torch.float32).train()
    text = " ".join(v for _, v in sorted(topics.items())[:50])
    ids = student_tok(text)["input_ids"][: batch * seq]
    rows = [ids[i * seq:(i + 1) * seq] for i in range(batch)]
    data = collate([Example(r, [True] * len(r), f"b{i}") for i, r in enumerate(rows)], student_tok.pad_token_id)
    fused = "fused" in variant
    if cross:
        terms = [{"name": "ce"}, {"name": "forward_kl"}, {"name": "uld", "params": {"support": "unmatched"}}]
        source = CrossTeacher(teacher, cross_vocab(student_tok, teacher_tok, student_vocab=len(student_tok),
                                                   teacher_vocab=vocab),
                              temperature=1.0, supports={"unmatched"}, chunk_rows=256)
    else:
        terms = [{"name": "ce"}, {"name": "forward_kl"}]
        source = OnlineTeacher(teacher, vocab_size=vocab)
    mix = LossMix(LossConfig(terms=terms, fused=fused, chunk_tokens=128 if fused else batch * seq))
    forward = StudentForward(student, fused=fused, hidden_layers=[], vocab=len(student_tok))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        signal = source.signal(data)
        out = forward(data)
        result = mix(StudentOutput(logits_btv=out.get("logits"), hidden_btd=out.get("hidden"), head=out.get("head")),
                     signal, data.target_ids, data.loss_mask)
        (result.total / result.count).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return time.perf_counter() - t0

    if variant == "same, held-out eval":
        from stillroom.eval.metrics import evaluate_lm, teacher_logits_from_model

        def step() -> float:  # noqa: F811 (the evaluation instead of a training step)
            t0 = time.perf_counter()
            evaluate_lm(student, [data], teacher_logits_from_model(teacher), precision="bf16", vocab_size=vocab)
            return time.perf_counter() - t0

    step()  # warm-up: optimizer state and gradient buffers exist from here on, as in a training loop
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    times = [step() for _ in range(3)]
    return {"variant": variant, "peak_bytes": _status("VmHWM") - base, "seconds": statistics.median(times),
            "student_vocab": len(student_tok), "teacher_vocab": vocab, "teacher_params": sum(
                p.numel() for p in teacher.parameters()), "student_params": sum(p.numel() for p in student.parameters())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=256_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variants", default="|".join(VARIANTS), help="a |-separated subset of: " + " | ".join(VARIANTS))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.seq, args.vocab, args.threads)))
        return 0
    results = []
    for variant in [v.strip() for v in args.variants.split("|") if v.strip()]:
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown {variant!r}; valid: {', '.join(VARIANTS)}")
        proc = subprocess.run([sys.executable, __file__, "--one", variant, "--batch", str(args.batch), "--seq",
                               str(args.seq), "--vocab", str(args.vocab), "--threads", str(args.threads)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = results[0]
    print(f"teacher vocabulary {args.vocab:,}, {args.batch}x{args.seq} tokens, {args.threads} threads; teacher "
          f"{first['teacher_params'] / 1e6:.1f}M parameters (bf16)\n")
    print("| variant | student vocabulary | peak memory of a step (MiB) | vs same, naive | step (s) | vs same, naive |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['student_vocab']:,} | {r['peak_bytes'] / 2**20:,.0f} | "
              f"{r['peak_bytes'] / first['peak_bytes']:.0%} | {r['seconds']:.2f} | {r['seconds'] / first['seconds']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
