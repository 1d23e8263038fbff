"""Teacher-store size vs training quality: how few bytes per position keep 200 KD steps within 1% of online.

Teacher: SmolLM2-135M-Instruct (30 layers, V = 49152). Student: the 10 layers derived from it (every 3rd).
Data: bundled prose, ``--seq``-token blocks; the stores cover the first ``--train-seqs`` training blocks.
For each variant (``online`` or ``k<K>/<logprob_dtype>``, e.g. ``k16/int8``; ``k16/int8-f32scale`` is the
int8 mode with the pre-float16 float32 scales; ``k32/sampled`` is a sampled store, ``teacher.store.signal:
sampled``: 32 tokens drawn per position, their frequencies the target, from its own teacher pass;
``k8/int8+t16`` is ``signal: topk_sampled``: the top 8 as ``k8/int8`` plus 16 draws outside them; drawn
variants draw independently (``teacher.store.draw: multinomial``), ``...-sys`` (e.g. ``k8/int8+t16-sys``)
systematically, ``...-alloc`` with the draws allocated over each sequence's positions (``draw: allocated``,
``+t16`` then the average), ``...-ranked`` with ids coded by rank (``teacher.store.id_code: ranked``, lossless;
one shard instead of 8192-token ones, as each shard carries its own table); a last ``-d<N>`` (e.g.
``k8/int8+t16-d1``) draws with draw seed N, another realisation of the same store, to see how much one store's
draws move a result):

1. a real store folder is written with :func:`write_store` (one teacher pass, top-``max k`` kept, sliced
   exactly for each k) and its bytes per position are the shard files' bytes over the covered positions;
2. the same initial student is trained for ``--steps`` forward-KL steps (fused loss, the loop's
   :func:`forward_backward`, AdamW, warm-up + cosine, grad-norm clip 1.0) on the same batch order (drawn
   from the seed), the teacher signal coming from the store or from the in-process teacher;
3. the held-out *dense* KL(teacher || student) per token (fp32, T = 1) is measured and compared with the
   online run of the same seed (same batch order): the paired difference isolates the store's effect.
   The spread between the online runs of different seeds (different batch orders) is reported next to it,
   so a difference can be judged against the run-to-run noise.

Why dense KL: the top-k estimate is a lower bound that misses the tail; the question is whether a student
trained on k + 1 bins ends as close to the *whole* teacher distribution as one trained on all V logits.

Resumable: every finished (variant, seed) is written to ``--out`` at once and skipped on a rerun with the
same settings (a rerun with other settings refuses, naming them, unless ``--fresh``).

    python bench/store_size.py [--steps 200] [--seeds 0,1] [--train-seqs 192] [--out docs/bench/store_size.json]
    python bench/store_size.py --report            # the tables of the results so far
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from stillroom.config.schema import DataConfig, DataSource, LayerSelection, ModelSource
from stillroom.data import build_splits, collate
from stillroom.models import derive_student, load_model, tokenizer_hash
from stillroom.models.precision import resolve_precision
from stillroom.teachers.signal import OnlineTeacher
from stillroom.teachers.store_reader import StoreReader, StoreTeacher
from stillroom.teachers.store_writer import make_header, model_compute, write_store

sys_path = Path(__file__).resolve().parent
import sys  # noqa: E402

sys.path.insert(0, str(sys_path))
from teacher_store import heldout_kl, sliced, train_kd  # noqa: E402  (shared with bench/teacher_store.py)

CPU = torch.device("cpu")
DEFAULT_VARIANTS = ("online,k16/int8,k32/int8,k8/int8,k24/int8,k16/int8@1,k16/float16,k32/float16,k24/float16,"
                    "k8/float16,k20/int4,k16/int8-f32scale")
SETTINGS = ("steps", "train_seqs", "heldout", "seq", "batch", "lr", "warmup", "precision")


def tail_draws(name: str) -> int:
    """``"k8/int8+t16"`` -> 16 (a ``topk_sampled`` store: the top 8 and 16 draws outside it); 0 otherwise."""
    return int(drawless(name).split("+t")[1]) if "+t" in name else 0


SYS = "-sys"
"""Variant suffix: the store's draws are systematic (``teacher.store.draw: systematic``) instead of independent."""
ALLOC = "-alloc"
"""Variant suffix: the tail draws are allocated (``teacher.store.draw: allocated``): each sequence's shared out over
its positions; ``+t<N>`` is then the average per position."""
RANKED = "-ranked"
"""Variant suffix (before any ``-d<N>``): the store codes its ids by rank (``teacher.store.id_code: ranked``),
written with the default shard size (one shard here) since each shard carries its own rank table; lossless, so
it trains exactly as the same variant without the suffix, and only its bytes differ."""
SEED = "-d"
"""Variant suffix ``-d<N>`` (last): the store's draws made with draw seed N (another realisation of the same store);
without it, draw seed 0 (what every earlier study used)."""


def draw_seed(name: str) -> int:
    """``"k8/int8+t16-d1"`` -> 1; ``"k8/int8+t16"`` -> 0."""
    m = re.search(r"-d(\d+)$", name)
    return int(m.group(1)) if m else 0


def drawless(name: str) -> str:
    """``name`` without its draw and id-code suffixes: ``"k8/int8+t16-sys-d1"`` -> ``"k8/int8+t16"``."""
    return re.sub(r"-d\d+$", "", name).removesuffix(RANKED).removesuffix(SYS).removesuffix(ALLOC)


def id_code(name: str) -> str:
    """``"k8/int8+t16-alloc-ranked"`` (or ``-ranked-d1``) -> ``ranked``; otherwise ``plain``."""
    return "ranked" if re.sub(r"-d\d+$", "", name).endswith(RANKED) else "plain"


def draw_kind(name: str) -> str:
    """``"k8/int8+t16-sys"`` (or ``-sys-d1``) -> ``systematic``; ``-alloc`` -> ``allocated``; any other drawn
    variant -> ``multinomial``."""
    bare = re.sub(r"-d\d+$", "", name).removesuffix(RANKED)
    return "systematic" if bare.endswith(SYS) else "allocated" if bare.endswith(ALLOC) else "multinomial"


def parse_variant(name: str) -> tuple[int, str, str | None]:
    """``"k16/int8"`` -> ``(16, "int8", None)``; ``"k16/int8-f32scale"`` -> ``(16, "int8", "float32")``;
    ``"k8/int8+t16"`` -> ``(8, "int8", None)`` (its draws: :func:`tail_draws`)."""
    try:
        k_part, dtype = drawless(name).split("+t")[0].split("/")
        scale = None
        if dtype.endswith("-f32scale"):
            dtype, scale = dtype[: -len("-f32scale")], "float32"
        return int(k_part.lstrip("k")), dtype, scale
    except ValueError:
        raise SystemExit(f"--variants: {name!r} is not 'online', 'k<K>/<logprob_dtype>[-f32scale]', "
                         "'k<K>/sampled[-sys][-d<N>]' or "
                         "'k<K>/<logprob_dtype>+t<draws>[-sys|-alloc][-ranked][-d<N>]'") from None


def wait_for_pause(pause_file: str | None, note) -> None:
    """Sleep while ``pause_file`` exists (another job on the machine is timing something)."""
    announced = False
    while pause_file and Path(pause_file).exists():
        if not announced:
            note(f"paused: {pause_file} exists")
            announced = True
        time.sleep(30)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def train_variant(student0, batches, source, vocab: int, args) -> tuple[torch.nn.Module, float]:
    """``--steps`` forward-KL steps from a copy of ``student0`` on ``batches`` (one per step); (student, seconds)."""
    return train_kd(student0, batches, source, vocab, lr=args.lr, warmup=args.warmup, precision=args.precision)


def batch_order(n_train: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """Training-block indices per step: epochs of a seeded permutation (the same for every variant of a seed)."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order += torch.randperm(n_train, generator=g).tolist()
    return [order[s * batch : (s + 1) * batch] for s in range(steps)]


def load_results(args) -> dict:
    path = Path(args.out)
    settings = {k: getattr(args, k) for k in SETTINGS}
    if path.is_file() and not args.fresh:
        old = json.loads(path.read_text("utf-8"))
        diff = [f"{k} (file {old.get('settings', {}).get(k)!r}, now {v!r})" for k, v in settings.items()
                if old.get("settings", {}).get(k) != v]
        if diff:
            raise SystemExit(f"{path} holds results of other settings: {'; '.join(diff)}; pass the same settings "
                             "to resume, --fresh to start over, or another --out")
        return old
    return {"settings": settings, "sizes": {}, "runs": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="KD steps per variant")
    ap.add_argument("--seeds", default="0,1", help="batch-order seeds of the online reference")
    ap.add_argument("--variant-seeds", default="0", help="batch-order seeds of the store variants")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma-separated, run in this order; NAME@0+1 runs NAME at seeds 0 and 1")
    ap.add_argument("--train-seqs", type=int, default=192, help="training blocks covered by the stores")
    ap.add_argument("--heldout", type=int, default=8, help="held-out blocks for the dense KL")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--precision", default="auto", help="auto (bf16 where the CPU has fast bf16), bf16 or fp32")
    ap.add_argument("--out", default="docs/bench/store_size.json")
    ap.add_argument("--store-dir", default=None, help="where the stores are written (default: a temp folder)")
    ap.add_argument("--fresh", action="store_true", help="ignore earlier results in --out")
    ap.add_argument("--report", action="store_true", help="only print the tables of the results in --out")
    ap.add_argument("--sizes-only", action="store_true", help="write the variants' stores and record their sizes in "
                    "--out; train nothing")
    ap.add_argument("--pause-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.report:
        print_table(json.loads(Path(args.out).read_text("utf-8")))
        return
    args.precision = resolve_precision(args.precision, "cpu")
    t_start = time.perf_counter()

    def note(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    results = load_results(args)
    results.update(machine=machine(), precision=args.precision)
    results.setdefault("commands", []).append("python bench/store_size.py " + " ".join(sys.argv[1:]))

    def dump() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.out)

    # "k16/int8@0+1": that variant at seeds 0 and 1 (else --seeds for online, --variant-seeds for the others).
    entries = [v.strip() for v in args.variants.split(",") if v.strip()]
    jobs = []
    for entry in entries:
        v, _, own = entry.partition("@")
        default = args.seeds if v == "online" else args.variant_seeds
        jobs += [(v, int(s)) for s in (own.split("+") if own else default.split(","))]
    jobs = list(dict.fromkeys(jobs))  # in the given order; a repeated (variant, seed) runs once
    variants = list(dict.fromkeys(v for v, _ in jobs))
    todo = [j for j in jobs if f"{j[0]}@{j[1]}" not in results["runs"]]
    note(f"{len(jobs) - len(todo)} of {len(jobs)} runs already in {args.out}")

    bf16 = args.precision == "bf16"
    loaded = load_model(ModelSource(builtin="smollm2-135m-instruct"), dtype=torch.float32)
    tok, vocab = loaded.tokenizer, len(loaded.tokenizer)
    student0, kept = derive_student(loaded.model, LayerSelection(strategy="every_n", every_n=3))
    student0 = student0.float()
    teacher = (loaded.model.to(torch.bfloat16) if bf16 else loaded.model).eval()
    identity = loaded.identity + (" (bf16)" if bf16 else "")
    splits = build_splits(DataConfig(sources=[DataSource(bundled="pydoc")], seq_len=args.seq), tok, 0)
    train, held = splits.train[: args.train_seqs], splits.heldout[: args.heldout]
    if len(train) < args.train_seqs or len(held) < args.heldout:
        raise SystemExit(f"--train-seqs/--heldout: only {len(splits.train)} training and {len(splits.heldout)} "
                         "held-out blocks")
    pad = tok.pad_token_id
    held_batches = [collate(held[i : i + args.batch], pad) for i in range(0, len(held), args.batch)]
    online = OnlineTeacher(teacher, vocab_size=vocab)
    held_teacher = [online.signal(b).logits_btv.float() for b in held_batches]
    results.update(student_layers=kept, train_blocks=len(train), heldout_blocks=len(held),
                   heldout_tokens=int(sum(int(b.loss_mask.sum()) for b in held_batches)))
    if "heldout_kl_initial" not in results:
        results["heldout_kl_initial"] = heldout_kl(student0, held_teacher, held_batches, vocab)
    note(f"models and data ready; precision {args.precision}, {torch.get_num_threads()} threads, "
         f"initial held-out KL {results['heldout_kl_initial']:.4f}")

    # ---- stores: one teacher pass at the largest k, sliced exactly for the others ------------------
    store_variants = [v for v in variants if v != "online"]
    tmp_root = Path(args.store_dir or tempfile.mkdtemp(prefix="stillroom-store-size-"))
    stores: dict[str, Path] = {}
    drawn = [v for v in store_variants if parse_variant(v)[1] == "sampled" or tail_draws(v)]
    for v in drawn:
        k, dtype, _ = parse_variant(v)
        signal, draws = ("topk_sampled", tail_draws(v)) if tail_draws(v) else ("sampled", 0)
        header = make_header(train, teacher_identity=identity, tokenizer_hash=tokenizer_hash(tok), vocab_size=vocab,
                             k=k, loss_temperature=1.0, logprob_dtype="float16" if signal == "sampled" else dtype,
                             shard_tokens=8192 if id_code(v) == "plain" else 262144, signal=signal,
                             tail_draws=draws, draw=draw_kind(v), draw_seed=draw_seed(v), id_code=id_code(v))
        compute = model_compute(teacher, k=k, loss_temperature=1.0, vocab_size=vocab, pad_id=pad,
                                batch_size=args.batch, signal=signal, tail_draws=draws, draw=header.draw,
                                draw_seed=header.draw_seed)
        m = write_store(tmp_root / v.replace("/", "_"), header, train, compute, overwrite=True, log=lambda s: None)
        stores[v] = tmp_root / v.replace("/", "_")
        results["sizes"][v] = {"bytes_per_position": m["store_bytes"] / m["tokens"], "store_bytes": m["store_bytes"],
                               "positions": m["tokens"]}
    store_variants = [v for v in store_variants if v not in drawn]
    if store_variants:
        kmax = max(parse_variant(v)[0] for v in store_variants)
        t0 = time.perf_counter()
        rows = {r.uid: r for r in model_compute(teacher, k=kmax, loss_temperature=1.0, vocab_size=vocab, pad_id=pad,
                                                batch_size=args.batch)(train)}
        note(f"teacher pass (top-{kmax}) over {len(train)} blocks in {time.perf_counter() - t0:.0f}s")
        for v in store_variants:
            k, dtype, scale = parse_variant(v)
            header = make_header(train, teacher_identity=identity, tokenizer_hash=tokenizer_hash(tok),
                                 vocab_size=vocab, k=k, loss_temperature=1.0, logprob_dtype=dtype, shard_tokens=8192)
            if scale:
                header.scale_dtype = scale
            folder = tmp_root / v.replace("/", "_")
            m = write_store(folder, header, train, sliced(rows, k), overwrite=True, log=lambda s: None)
            stores[v] = folder
            results["sizes"][v] = {"bytes_per_position": m["store_bytes"] / m["tokens"],
                                   "store_bytes": m["store_bytes"], "positions": m["tokens"]}
        del rows
        dump()
        note("stores written: " + ", ".join(f"{v} {s['bytes_per_position']:.1f} B" for v, s in results["sizes"].items()))

    if args.sizes_only:
        dump()
        note("sizes only: " + ", ".join(f"{v} {s['bytes_per_position']:.2f} B" for v, s in results["sizes"].items()
                                        if v in variants))
        todo = []  # train nothing; the temporary stores are removed below

    # ---- training runs ------------------------------------------------------------------------------
    for v, seed in todo:
        wait_for_pause(args.pause_file, note)
        batches = [collate([train[i] for i in idx], pad) for idx in batch_order(len(train), args.steps, args.batch, seed)]
        source = online if v == "online" else StoreTeacher(StoreReader(stores[v]))
        torch.manual_seed(seed)
        student, secs = train_variant(student0, batches, source, vocab, args)
        kl = heldout_kl(student, held_teacher, held_batches, vocab)
        results["runs"][f"{v}@{seed}"] = {"variant": v, "seed": seed, "heldout_kl": kl, "train_s": secs}
        results["partial"] = any(f"{j}@{s}" not in results["runs"] for j, s in jobs)
        summarize(results)
        dump()
        note(f"{v} seed {seed}: held-out KL {kl:.4f} ({secs:.0f}s, {secs / args.steps:.2f} s/step)")
        del student
    summarize(results)
    results["partial"] = any(f"{v}@{s}" not in results["runs"] for v, s in jobs)
    dump()
    print_table(results)
    if not args.store_dir:
        import shutil

        shutil.rmtree(tmp_root, ignore_errors=True)


def summarize(results: dict) -> None:
    """Per run: % difference to the online run of the same seed; the online seed spread."""
    runs = results["runs"]
    online = {r["seed"]: r["heldout_kl"] for r in runs.values() if r["variant"] == "online"}
    for r in runs.values():
        base = online.get(r["seed"])
        r["vs_online"] = None if base is None else r["heldout_kl"] / base - 1.0
    if len(online) >= 2:
        vals = list(online.values())
        mean = sum(vals) / len(vals)
        results["online_seed_spread"] = {"values": online, "mean": mean, "max_minus_min_rel": (max(vals) - min(vals)) / mean}
    results["variants"] = variant_rows(results)


def variant_rows(results: dict) -> list[dict]:
    """One row per variant: bytes/position, held-out KL and paired % vs online per seed, and the verdict.

    ``within_1pct``: every seed's paired difference is within 1%; ``seeds`` says how many seeds back it
    (one seed cannot tell a real difference below the run-to-run spread from noise: see the verdict).
    """
    by_variant: dict[str, dict] = {}
    for r in results["runs"].values():
        row = by_variant.setdefault(r["variant"], {"variant": r["variant"], "kl": {}, "vs_online": {}})
        row["kl"][r["seed"]] = r["heldout_kl"]
        if r.get("vs_online") is not None:
            row["vs_online"][r["seed"]] = r["vs_online"]
    for row in by_variant.values():
        row["bytes_per_position"] = results["sizes"].get(row["variant"], {}).get("bytes_per_position")
        diffs = list(row["vs_online"].values()) if row["variant"] != "online" else []
        row["within_1pct"] = bool(diffs) and all(abs(d) <= 0.01 for d in diffs)
        row["seeds"] = len(diffs)
    return list(by_variant.values())


def print_table(results: dict) -> None:
    spread = results.get("online_seed_spread", {}).get("max_minus_min_rel")
    print(f"\nonline held-out KL spread over seeds (max - min over mean): "
          f"{'n/a (one seed)' if spread is None else f'{spread:.2%}'}")
    print("| variant | bytes/position | held-out KL (seed: value) | vs online, same seed | within 1% |\n"
          "|---|---:|---|---|---|")
    for row in variant_rows(results):
        size = row["bytes_per_position"]
        kls = ", ".join(f"{s}: {v:.4f}" for s, v in sorted(row["kl"].items()))
        vs = ", ".join(f"{s}: {v:+.2%}" for s, v in sorted(row["vs_online"].items())) if row["seeds"] else "-"
        ok = "-" if row["variant"] == "online" else ("yes" if row["within_1pct"] else "no") + f" ({row['seeds']} seed(s))"
        print(f"| {row['variant']} | {'-' if size is None else f'{size:.1f}'} | {kls} | {vs} | {ok} |")


if __name__ == "__main__":
    main()
