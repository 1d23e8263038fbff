"""The commands whose settings are flags: each a typed config section (its fields are the flags, their
defaults the schema's) and one library function. Nothing else happens here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from stillroom.cli.sections import section_command
from stillroom.config.commands import (
    ConditionalDemoDataConfig,
    ConditionalExtendConfig,
    DraftDataConfig,
    MergeConfig,
    PreferenceDataConfig,
    ServeTeacherConfig,
    SpecEvalConfig,
)
from stillroom.config.knowledge import KnowledgeDataConfig
from stillroom.config.mend import MendTasksConfig
from stillroom.config.quantize import QuantizeFolderConfig
from stillroom.config.scenes import VqaDataConfig, VqaLmConfig
from stillroom.config.transfer import TransferConfig


# The work of each command, imported when the command runs (`stillroom --help` stays fast).
def _spec_eval(cfg: SpecEvalConfig) -> None:
    from stillroom.run.spec_eval import spec_eval

    spec_eval(cfg)


def _serve_teacher(cfg: ServeTeacherConfig) -> None:
    from stillroom.run.serve import serve_teacher

    serve_teacher(cfg)


def _draft_data(cfg: DraftDataConfig) -> None:
    from stillroom.datagen.draft_data import make_draft_data

    make_draft_data(cfg)


def _preference_data(cfg: PreferenceDataConfig) -> None:
    from stillroom.datagen.preference import make_preference_data

    make_preference_data(cfg)


def _merge(cfg: MergeConfig) -> None:
    from stillroom.compress.merge import merge

    merge(cfg)


def _transfer(cfg: TransferConfig) -> None:
    from stillroom.compress.transfer import transfer

    transfer(cfg)


def _quantize(cfg: QuantizeFolderConfig) -> None:
    from stillroom.compress.quant_export import quantize_folder

    quantize_folder(cfg.folder, cfg.quantize_config(), cfg.out, overwrite=cfg.overwrite)


def _conditional_extend(cfg: ConditionalExtendConfig) -> None:
    from stillroom.run.conditional_setup import conditional_extend

    conditional_extend(cfg)


def _conditional_demo_data(cfg: ConditionalDemoDataConfig) -> None:
    from stillroom.run.conditional_setup import conditional_demo_data

    conditional_demo_data(cfg)


def _knowledge_data(cfg: KnowledgeDataConfig) -> None:
    from stillroom.datagen.knowledge import write_knowledge_suite

    write_knowledge_suite(cfg)


def _mend_data(cfg: MendTasksConfig) -> None:
    from stillroom.datagen.mend_tasks import write_mend_tasks

    write_mend_tasks(cfg)


def _vqa_data(cfg: VqaDataConfig) -> None:
    from stillroom.domains.vl.vqa import write_vqa_data

    write_vqa_data(cfg)


def _vqa_lm(cfg: VqaLmConfig) -> None:
    from stillroom.domains.vl.vqa_lm import write_vqa_lm

    write_vqa_lm(cfg)


@dataclass(frozen=True)
class FlagCommand:
    name: str
    section: type
    run: Callable[[Any], Any]
    help: str
    description: str | None = None
    positional: tuple[str, ...] = ()


COMMANDS = (
    FlagCommand(
        "spec-eval", SpecEvalConfig, _spec_eval, "measure a draft model for speculative decoding of a target",
        "Speculative decoding with --draft proposing for --target: acceptance rate, block efficiency (measured and "
        "DistillSpec's estimate), memory-bound and measured speed-up. Writes report.json, report.md and "
        "block_efficiency.png into --out (default: runs/spec-eval/<draft>-vs-<target>)."),
    FlagCommand(
        "serve-teacher", ServeTeacherConfig, _serve_teacher,
        "serve a local teacher over an OpenAI-compatible API (prompt log-probs for logit KD, generations)",
        "Serve MODEL (a Hugging Face folder, a .gguf file, or builtin:smollm2-135m-instruct) with /v1/completions "
        "(vLLM-style prompt_logprobs), /v1/chat/completions, /v1/models and /health. Binds to loopback unless "
        "--host says otherwise. Train against it with teacher.source=remote.", ("model",)),
    FlagCommand(
        "draft-data", DraftDataConfig, _draft_data, "generate a draft's distillation data from the target's completions",
        "The target samples completions of chat prompts (messages up to the last user turn, rendered with its chat "
        "template) into a resumable store next to --out, exported as prompt/completion JSONL for a draft recipe "
        "(draft_forward_kl, draft_tvd_pp, draft_onpolicy). Rerun the same command to resume."),
    FlagCommand(
        "preference-data", PreferenceDataConfig, _preference_data,
        "REDI: write D_SFT (sft.jsonl) and D_Pref (pref.jsonl) from verified teacher generations",
        "From `stillroom generate`'s export (--export; prompt_completion, keep: all, with a verifier) or from a "
        "generation store and its problems (--store with --items, checked by --verifier): every correct trace into "
        "<out>/sft.jsonl, one correct and one incorrect trace per problem into <out>/pref.jsonl. Prints the counts. "
        "See docs/methods/redi.md."),
    FlagCommand(
        "merge", MergeConfig, _merge, "SLERP-merge two models of the same architecture (self-data distillation step 3)",
        "Spherical linear interpolation of every floating tensor of two Hugging Face model folders (safetensors) of "
        "the same architecture: SLERP(A, B; t) = [sin((1-t)W) A + sin(tW) B] / sin W with W the angle between the "
        "flattened tensors; linear interpolation where sin W ~ 0. t=0 gives A, t=1 gives B. Writes safetensors plus "
        "A's config and tokenizer into --out (built in a temporary folder, then renamed).", ("a", "b")),
    FlagCommand(
        "transfer", TransferConfig, _transfer,
        "fine-tuning transfer: add a fine-tuned model's diff vector to a newer base (out = new_base + scale * diff)",
        "Diff-vector transfer (Lin et al. 2025): OUT = NEW_BASE + SCALE * (FINE_TUNED - BASE), tensor by tensor in "
        "float64. The three Hugging Face folders must share the architecture, parameter names and shapes and the "
        "tokenizer (checked first, named errors); extra vocabulary rows of the fine-tuned model are zero-padded in "
        "the bases. Writes safetensors plus the fine-tuned model's config and tokenizer and transfer.json into "
        "--out; the result can start further fine-tuning as student.model.path. See docs/methods/transfer.md."),
    FlagCommand(
        "quantize", QuantizeFolderConfig, _quantize,
        "round-to-nearest quantization of a model folder to llama.cpp Q8_0 / Q4_0 (HF folder on the grid + GGUF)",
        "Post-training quantization, no training (the PTQ baseline of QAD): the linear layers' weights rounded to "
        "the Q8_0 / Q4_0 block grid exactly as llama.cpp's reference quantizer does; writes --out as a plain "
        "Hugging Face folder holding the dequantized grid weights, and <out>.gguf beside it. To recover the loss, "
        "train with student.quantize instead (docs/methods/qad.md).", ("folder",)),
    FlagCommand(
        "conditional-extend", ConditionalExtendConfig, _conditional_extend,
        "add conditional training's control tokens to a model (tokenizer + embeddings)",
        "Load SRC, add <|aligned|>/<|misaligned|> as special tokens, resize the embeddings (new rows = mean row) and "
        "save DST for `method: conditional`.", ("src", "dst")),
    FlagCommand(
        "conditional-demo-data", ConditionalDemoDataConfig, _conditional_demo_data,
        "write the synthetic BAD-word corpus as text JSONL", positional=("out",)),
    FlagCommand(
        "knowledge-data", KnowledgeDataConfig, _knowledge_data,
        "write a knowledge-injection suite: fictional new and updated facts, asked as trained, paraphrased, implied",
        "FineTuneBench-style (Wu et al. 2024): OUT/background.jsonl (text for pretraining a base model: world facts, "
        "known people in every question form, the companies' old headquarters), OUT/train.jsonl and "
        "train_augmented.jsonl (prompt/completion: new people and moved headquarters, in one or two phrasings), "
        "OUT/eval.jsonl (items scored by eval.knowledge=OUT: trained phrasing, paraphrase, implication) and "
        "suite.json. See docs/methods/finetunebench.md.", ("out",)),
    FlagCommand(
        "mend-data", MendTasksConfig, _mend_data,
        "MEND: write synthetic key->value tasks and a random tiny LLM for its in-context-learning check",
        "Random key -> value mapping tasks (a key-value pair is one token): --out/train.jsonl (meta-training "
        "records: demonstrations + a query), test.jsonl (unseen tasks), pretrain.jsonl (stage 1 text), icl.jsonl "
        "(text to pretrain the frozen LLM for in-context look-up) and llm_init/ (a random tiny Llama with the "
        "task tokenizer). Then `stillroom run mend`. See docs/methods/mend.md."),
    FlagCommand(
        "vqa-data", VqaDataConfig, _vqa_data, "write visual questions about procedural scenes (images or text)",
        "Scenes of coloured shapes in a 2 x 2 grid with exact captions, and checkable questions (colour_of, "
        "shape_at, count, exists, unanswerable; levels 1-3). --format images writes OUT/images/<id>.png and "
        "OUT/records.jsonl (image, prompt, completion, family, level, caption) for the VLM and CLIP domains; "
        "--format text writes OUT as prompt/completion JSONL with the scene as its caption, for any language "
        "model. See docs/methods/comd.md.", ("out",)),
    FlagCommand(
        "vqa-lm", VqaLmConfig, _vqa_lm, "write a small random Llama + tokenizer for the text scene questions",
        "A randomly initialised LlamaForCausalLM with a byte-level BPE tokenizer trained on the scene-question "
        "vocabulary, saved to OUT as a plain Hugging Face folder: train it into a text-QA teacher with method: sft "
        "on `stillroom vqa-data --format text` data, and derive students from its config. See "
        "docs/methods/comd.md.", ("out",)),
)


def register(subparsers) -> None:
    for c in COMMANDS:
        section_command(subparsers, c.name, c.section, c.run, positional=c.positional, help=c.help,
                        description=c.description)
