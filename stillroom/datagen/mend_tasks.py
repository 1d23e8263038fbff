"""Synthetic key -> value mapping tasks for MEND's CPU check, and the tiny frozen LLM that learns them in context.

A task is a random function ``f`` from the key symbols to the value symbols. A record of a task shows K
demonstrations ``kf(k);`` (a key character, its value character, ``;``; every key at least once when K >= the
number of keys, in random order) and asks ``?q`` for a key ``q`` it showed; the answer is ``f(q)``. Without its
demonstrations the answer is a guess (accuracy ~ 1 / number of values); with them it is a look-up.

The tokenizer reads a demonstration's ``kv`` as one token (a word-level vocabulary of every key-value pair, plus
the single keys, values, ``;`` and ``?``), so the look-up is one attention hop (the query key finds the pair token
holding it and copies its value), which a 2-layer model learns in a few hundred steps on 2 CPU cores; with
character tokens it must first grow an induction circuit, which took longer than the check's budget here.

Files written into ``MendTasksConfig.out`` (each atomically):

* ``train.jsonl`` / ``test.jsonl``: ``{"demonstrations": ["a3;", ...], "prompt": "?q", "completion": "v",
  "task": i}`` (MEND's finetune records; ``mend.demo_separator: ""``); test tasks are never train tasks;
* ``pretrain.jsonl``: ``{"text": "a3;b5;...;?c7;"}`` (stage pretrain: plain text of further tasks);
* ``icl.jsonl``: ``{"text": ...}`` sequences of pairs and queries of further tasks (a query ``?kv;`` only for a
  key shown before), to pretrain the frozen LLM for in-context look-up;
* ``llm_init/``: a randomly initialised tiny Llama and the tokenizer (``<pad>``, ``<eos>``, ``<unk>`` first), a
  Hugging Face folder to train into the frozen LLM (:func:`train_icl_llm`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

from stillroom.config.mend import SEPARATORS, MendTasksConfig
from stillroom.files import write_atomic

FILES = ("train.jsonl", "test.jsonl", "pretrain.jsonl", "icl.jsonl")


def random_task(rng: random.Random, keys: str, values: str) -> dict[str, str]:
    """A random function keys -> values."""
    return {k: rng.choice(values) for k in keys}


def demonstrations(rng: random.Random, task: dict[str, str], k: int) -> list[str]:
    """``k`` pairs ``{key}{value};``: every key once (while ``k`` allows), then random keys, shuffled."""
    keys = list(task)
    rng.shuffle(keys)
    shown = keys[:k] + [rng.choice(keys) for _ in range(max(0, k - len(keys)))]
    rng.shuffle(shown)
    return [f"{key}{task[key]};" for key in shown]


def task_records(rng: random.Random, task: dict[str, str], task_id: int, cfg: MendTasksConfig) -> list[dict]:
    """``queries_per_task`` finetune records of one task, each with its own demonstrations and a shown key."""
    out = []
    for _ in range(cfg.queries_per_task):
        demos = demonstrations(rng, task, cfg.demos)
        query = rng.choice([d[0] for d in demos])
        out.append({"demonstrations": demos, "prompt": f"?{query}", "completion": task[query], "task": task_id})
    return out


def pair_text(rng: random.Random, task: dict[str, str], items: int) -> str:
    """``items`` items ``kv;`` or, for a key shown earlier, (half the time) a query ``?kv;``."""
    shown: list[str] = []
    out = []
    for _ in range(items):
        if shown and rng.random() < 0.5:
            key = rng.choice(shown)
            out.append(f"?{key}{task[key]};")
        else:
            key = rng.choice(list(task))
            shown.append(key)
            out.append(f"{key}{task[key]};")
    return "".join(out)


def make_records(cfg: MendTasksConfig) -> dict[str, list[dict]]:
    """Every file's records (tasks drawn from one seeded stream: train, test, pretrain, icl, in that order; a
    test task identical to a train task is redrawn)."""
    rng = random.Random(cfg.seed)
    seen: set[tuple[str, ...]] = set()

    def new_task() -> dict[str, str]:
        while True:
            task = random_task(rng, cfg.keys, cfg.values)
            sig = tuple(task.values())
            if sig not in seen:
                seen.add(sig)
                return task

    train = [r for i in range(cfg.train_tasks) for r in task_records(rng, new_task(), i, cfg)]
    test = [r for i in range(cfg.test_tasks) for r in task_records(rng, new_task(), cfg.train_tasks + i, cfg)]
    pretrain = [{"text": pair_text(rng, new_task(), cfg.demos + 4)} for _ in range(cfg.pretrain_texts)]
    icl = [{"text": pair_text(rng, new_task(), cfg.icl_items)} for _ in range(cfg.icl_texts)]
    return {"train.jsonl": train, "test.jsonl": test, "pretrain.jsonl": pretrain, "icl.jsonl": icl}


def task_tokenizer(cfg: MendTasksConfig):
    """A word-level ``PreTrainedTokenizerFast``: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then every key-value pair
    (one token), every key, every value and the separators; a key followed by a value is read as their pair, except
    after ``?`` (a query key and its answer stay two tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pairs = [k + v for k in cfg.keys for v in cfg.values]
    words = ["<pad>", "<eos>", "<unk>", *pairs, *cfg.keys, *cfg.values, *SEPARATORS]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    pattern = rf"(?<!\?)[{re.escape(cfg.keys)}][{re.escape(cfg.values)}]|."
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def random_llm(cfg: MendTasksConfig, vocab_size: int):
    """A seeded random tiny Llama (tied embeddings) for the task vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, cfg.llm_hidden // 16)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.llm_hidden, intermediate_size=4 * cfg.llm_hidden,
                         num_hidden_layers=cfg.llm_layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=None, eos_token_id=1,
                         pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config).eval()


def write_mend_tasks(cfg: MendTasksConfig, log: Callable[[str], None] = print) -> Path:
    """Write the files of the module docstring into ``cfg.out``; returns the folder."""
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in make_records(cfg).items():
        write_atomic(out / name, "".join(json.dumps(r) + "\n" for r in rows))
        log(f"mend tasks: {len(rows)} records -> {out / name}")
    tokenizer = task_tokenizer(cfg)
    tmp, final = out / ".llm_init.tmp", out / "llm_init"
    shutil.rmtree(tmp, ignore_errors=True)
    random_llm(cfg, len(tokenizer)).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    log(f"mend tasks: random {cfg.llm_layers}-layer Llama (d {cfg.llm_hidden}) + tokenizer -> {final}")
    return out


def icl_llm_recipe(data_dir: Path, run_dir: Path, *, steps: int, seed: int, lr: float = 3e-3,
                   batch: int = 32) -> dict:
    """The ``stillroom run`` config (``method: sft``, plain text ``icl.jsonl``) that trains ``llm_init`` into the
    frozen in-context learner; its student is saved into ``run_dir/student``."""
    init = str(Path(data_dir) / "llm_init")
    return {"name": run_dir.name, "output_dir": str(run_dir.parent), "method": "sft", "seed": seed,
            "teacher": {"model": {"path": init}, "dtype": "float32"}, "student": {"model": {"path": init}},
            "data": {"sources": [{"path": str(Path(data_dir) / "icl.jsonl"), "format": "text"}], "seq_len": 128,
                     "pack": False, "heldout_fraction": 0.02, "heldout_max": 16},
            "loss": {"terms": [{"name": "ce"}]},
            "train": {"steps": steps, "micro_batch_size": batch, "lr": lr, "warmup_steps": 50,
                      "schedule": "cosine", "precision": "fp32", "keep_checkpoints": 1, "weight_decay": 0.0},
            "eval": {"before": False, "generations": 0, "heldout_sequences": 8, "speed_tokens": 16}}


def train_icl_llm(data_dir: Path, cache_dir: Path, *, steps: int, seed: int, log: Callable[[str], None] = print
                  ) -> Path:
    """The frozen LLM: ``llm_init`` trained on ``icl.jsonl`` through ``stillroom run`` (method sft), cached under
    ``cache_dir`` by a hash of the data and the settings; returns its Hugging Face folder."""
    import hashlib

    from stillroom.config.schema import RunConfig
    from stillroom.models.cached import settings_key
    from stillroom.run import run

    digest = hashlib.sha256((Path(data_dir) / "icl.jsonl").read_bytes()).hexdigest()[:16]
    key = settings_key({"icl": digest, "steps": steps, "seed": seed, "v": 1})
    folder = Path(cache_dir) / f"mend-icl-{key}"
    if (folder / "student" / "config.json").is_file():
        log(f"mend: frozen LLM from the cache {folder / 'student'}")
        return folder / "student"
    tmp = Path(cache_dir) / f".tmp-mend-icl-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    run(RunConfig.model_validate(icl_llm_recipe(data_dir, tmp, steps=steps, seed=seed)), log=lambda _m: None)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / "student"
