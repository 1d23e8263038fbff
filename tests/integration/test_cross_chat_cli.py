"""teacher.cross.chat_template: own through the real CLI: chat records rendered by each side's own template
(a '### role:' student, a ChatML teacher) train; the positions that align lie inside message contents."""

import json
import re

from cli_helpers import stillroom
from helpers import other_tokenizer

STUDENT = {"from_config": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
                           "num_attention_heads": 4, "num_key_value_heads": 2}}
TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant: {% endif %}")
QUIET = ["eval.before=false", "eval.generations=0", "eval.speed_tokens=16", "eval.heldout_sequences=4"]


def test_each_side_renders_its_own_chat_template(recipe_factory, tmp_path):
    folder = tmp_path / "student_tok"
    tok = other_tokenizer(400)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    data = tmp_path / "chat.jsonl"
    words = ["list", "tuple", "dict", "set", "string", "module", "class", "function"]
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is a {w}?"},
        {"role": "assistant", "content": f"A {w} is an object with its own methods and attributes."}]}) + "\n"
        for w in words * 2))
    recipe = recipe_factory(teacher={"tokenizer_mode": "cross", "cross": {"chat_template": "own"}},
                            student={**STUDENT, "tokenizer": str(folder)},
                            data={"sources": [{"path": str(data)}], "seq_len": 64, "heldout_fraction": 0.25},
                            loss={"terms": [{"name": "ce"}, {"name": "forward_kl"}], "chunk_tokens": 16},
                            train={"steps": 3, "micro_batch_size": 4, "precision": "fp32", "warmup_steps": 1,
                                   "lr": 1e-3})
    out = stillroom("run", str(recipe), *QUIET).stdout
    chats = re.search(r"cross-tokenizer: (\d+) chat sequences rendered by each side's own chat template", out)
    assert chats and int(chats.group(1)) == 16, out[-2000:]
    share = re.search(r"(\d+)/(\d+) target positions \(([\d.]+)%\) align", out)
    aligned, targets = int(share.group(1)), int(share.group(2))
    assert 0 < aligned < targets  # inside the answers, not at their scaffolding ("<eos>\n" vs "<|im_end|>\n")
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss/forward_kl"] > 0 for r in rows)
    report = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert report["models"]["teacher"]["bits_per_byte"] > 0
