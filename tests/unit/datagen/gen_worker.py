"""Subprocess body for the SIGKILL resume test: generate with a tiny random teacher into a store.

Usage: python gen_worker.py STORE_PATH N_ITEMS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for helpers

from helpers import tiny_llama, tiny_tokenizer  # noqa: E402

from stillroom.data.arithmetic import generate_problems  # noqa: E402
from stillroom.datagen.store import GenerationStore  # noqa: E402
from stillroom.datagen.complete import generate_with_teacher  # noqa: E402

N_SAMPLES = 2
BATCH = 2


def run(store_path: str, n_items: int) -> dict:
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=2, seed=0)
    items = generate_problems(n_items, seed=0)
    with GenerationStore(store_path) as store:
        return generate_with_teacher(
            model, tok, items, template="{question}", n_samples=N_SAMPLES, sampling_temperature=1.0, top_p=0.95,
            max_new_tokens=8, batch_size=BATCH, store=store, teacher_id="tiny-random", seed=0,
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run(sys.argv[1], int(sys.argv[2]))))
