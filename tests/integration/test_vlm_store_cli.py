"""A VLM teacher through a store: `cache-teacher` runs the LLaVA teacher on the image records once; a store-fed run
with k = V trains exactly as the online teacher does; an image changed after the store was written is refused
before training (the store's data fingerprint hashes every image file)."""

import json

from cli_helpers import assert_same_losses, stillroom
from test_vlm_cli import _recipe

NO_EVAL = ["eval.before=false"]


def test_a_vlm_store_with_k_equal_v_trains_like_the_online_teacher(tmp_path):
    recipe = _recipe(tmp_path, "vs", teacher={"dtype": "float32", "store": {"k": 300, "logprob_dtype": "float32"}},
                     loss={"terms": [{"name": "forward_kl"}, {"name": "ce", "weight": 0.5}], "chunk_tokens": 32})
    out = stillroom("cache-teacher", str(recipe))
    assert "k=300 of V=300, float32 log-probs" in out.stdout
    stillroom("run", str(recipe), "name=online", *NO_EVAL)
    stillroom("run", str(recipe), "name=stored", "teacher.source=store", f"teacher.store.path={tmp_path}/runs/vs/"
              "teacher_store", *NO_EVAL)
    assert_same_losses(tmp_path / "runs" / "stored", tmp_path / "runs" / "online", abs=1e-5, steps=3)

    records = next((tmp_path / "cache" / "vqa").iterdir()) / "records.jsonl"
    image = json.loads(records.read_text().splitlines()[0])["image"]
    path = image if image.startswith("/") else str(records.parent / image)
    from PIL import Image

    with Image.open(path) as img:
        img.rotate(90).save(path)
    bad = stillroom("run", str(recipe), "name=changed", "teacher.source=store",
                    f"teacher.store.path={tmp_path}/runs/vs/teacher_store", *NO_EVAL, check=False)
    assert bad.returncode != 0 and "data_fingerprint" in bad.stdout + bad.stderr
