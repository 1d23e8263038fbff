"""`stillroom generate`: the recipe-driven teacher generation pipeline.

Steps (each checked before the teacher is loaded where possible):

1. Read the input records (``generate.input``: a file, or bundled arithmetic
   problems) and render every prompt from ``generate.template``; a missing
   field or a duplicate id is an error naming the record.
2. Build the teacher's ``complete_fn``: ``teacher.source: online`` loads
   ``teacher.model`` and samples with :func:`~stillroom.datagen.complete.hf_complete_fn`;
   ``remote`` asks an OpenAI-compatible server through
   :func:`~stillroom.datagen.remote_complete.remote_complete` (API key from the env var
   ``teacher.remote.api_key_env``, never logged).
3. :func:`~stillroom.datagen.complete.generate_with` appends each batch
   to the :class:`~stillroom.datagen.store.GenerationStore` as it arrives
   (resumable: a rerun generates only the missing samples; malformed outputs
   are stored with an ``error`` and counted).
4. Summary (``<store>.summary.json`` and one printed line): samples, malformed
   outputs by kind, verifier results, rationale parse failures, export counts.
5. Optional export of a training file (``generate.export``; layouts in
   :mod:`stillroom.datagen.export` and docs/GENERATE.md).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from stillroom.config.load import ConfigError
from stillroom.config.schema import GenerateConfig, GenerateInput, RunConfig
from stillroom.data.jsonl import write_jsonl_atomic
from stillroom.datagen.export import export_rows, with_answer, write_json_atomic
from stillroom.datagen.store import GenerationStore
from stillroom.datagen.complete import CompleteFn, generate_with, render_prompts

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs


def load_items(gcfg: GenerateConfig) -> list[dict]:
    """The input records (at most ``gcfg.limit``), in file order."""
    src = gcfg.input
    if src is None:
        raise ConfigError("generate.input is not set: give a JSONL file (generate.input=problems.jsonl) or "
                          "bundled problems (generate.input={bundled: arithmetic, n: 200})")
    if isinstance(src, GenerateInput):
        from stillroom.data.arithmetic import generate_problems

        try:
            n = src.n if gcfg.limit is None else min(src.n, gcfg.limit)
            items = generate_problems(n, seed=src.seed, levels=src.levels)
        except ValueError as e:
            raise ConfigError(f"generate.input: {e}") from None
        return items
    from stillroom.config.schema import DataSource
    from stillroom.data.errors import BadRecord, DataError
    from stillroom.data.readers import read_source

    path = Path(src).expanduser()
    if not path.is_file():
        raise ConfigError(f"generate.input: file {path} not found")
    items = []
    try:
        for rec in read_source(DataSource(path=str(path)), seed=0):
            if isinstance(rec, BadRecord):
                raise ConfigError(f"generate.input: {rec}; fix or remove that line")
            items.append(rec.fields)
            if gcfg.limit is not None and len(items) >= gcfg.limit:
                break
    except DataError as e:
        raise ConfigError(f"generate.input: {e}") from None
    if not items:
        raise ConfigError(f"generate.input: {path} has no records")
    return items


def _check_inputs(items: list[dict], gcfg: GenerateConfig) -> None:
    """Every template renders and every field the verifier/export needs is present, before any generation."""
    if gcfg.template is None:
        raise ConfigError("generate.template is not set; e.g. generate.template='{question}' "
                          "(str.format over the input record's fields)")
    try:
        render_prompts(items, gcfg.template, id_field=gcfg.id_field)
    except (KeyError, ValueError, TypeError) as e:
        msg = e.args[0] if e.args else str(e)
        raise ConfigError(f"generate.template / generate.input: {msg}") from None
    if gcfg.sampling_temperature == 0 and gcfg.n_samples > 1:
        raise ConfigError("generate.sampling_temperature=0 (greedy) gives identical samples; "
                          "set generate.n_samples=1 or a temperature > 0")
    ex = gcfg.export
    if ex.path is not None:
        for i, item in enumerate(items):
            try:
                ex.prompt_template.format(**item)
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(f"generate.export.prompt_template cannot be rendered for input record {i} "
                                  f"(id={item.get(gcfg.id_field)!r}): {e!r}; record keys: {sorted(item)}") from None
            if ex.fallback_to_original and ex.original_field not in item:
                raise ConfigError(f"generate.export.fallback_to_original needs field {ex.original_field!r} "
                                  f"(generate.export.original_field) in every record; record {i} has {sorted(item)}")
        if ex.keep != "all" and gcfg.verifier is None:
            raise ConfigError(f"generate.export.keep={ex.keep} needs generate.verifier (numeric, string or "
                              "package.module:function)")
        rationale = gcfg.mode == "rationale" or ex.format == "rationale"
        if rationale and ex.label_type == "gt" and any(gcfg.answer_field not in it for it in items):
            raise ConfigError(f"generate.export.label_type=gt needs field {gcfg.answer_field!r} "
                              "(generate.answer_field) in every record; set generate.export.label_type=llm "
                              "for unlabeled data")
    if gcfg.verifier in ("numeric", "string"):
        missing = [i for i, it in enumerate(items) if gcfg.answer_field not in it]
        if missing:
            raise ConfigError(f"generate.verifier={gcfg.verifier} needs field {gcfg.answer_field!r} "
                              f"(generate.answer_field) in every record; record {missing[0]} has none")


def _verifier(gcfg: GenerateConfig):
    if gcfg.verifier is None:
        return None
    from stillroom.datagen.verifiers import VerifierSpecError, load_verifier

    try:
        return with_answer(load_verifier(gcfg.verifier), gcfg.answer_field)
    except VerifierSpecError as e:
        raise ConfigError(f"generate.verifier: {e}") from None


def _path(cfg: RunConfig, template: str, key: str) -> Path:
    """A path setting; ``{output_dir}`` and ``{name}`` in it are replaced by the run's."""
    try:
        return Path(template.format(output_dir=cfg.output_dir, name=cfg.name)).expanduser()
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"{key}={template!r}: only {{output_dir}} and {{name}} may appear in braces ({e!r})") from None


def store_path(cfg: RunConfig) -> Path:
    """``generate.output``, or ``<output_dir>/<name>/generations.jsonl``."""
    if cfg.generate.output is not None:
        return _path(cfg, cfg.generate.output, "generate.output")
    return cfg.run_dir / "generations.jsonl"


def export_path(cfg: RunConfig) -> Path | None:
    """``generate.export.path`` (``{output_dir}``/``{name}`` filled in), or None."""
    p = cfg.generate.export.path
    return None if p is None else _path(cfg, p, "generate.export.path")


# ----------------------------------------------------------------------------- teacher


def generation_settings(gcfg: GenerateConfig, chat: bool) -> dict:
    """What is stored with every sample; a rerun with other settings is refused (unless allow_mixed_settings)."""
    return {"mode": gcfg.mode, "template": gcfg.template, "sampling_temperature": gcfg.sampling_temperature,
            "top_p": gcfg.top_p, "max_new_tokens": gcfg.max_new_tokens, "seed": gcfg.seed, "chat": chat}


def build_teacher(cfg: RunConfig, log: Log) -> tuple[CompleteFn, str, bool, Callable[[], None]]:
    """``(complete_fn, teacher_id, chat, close)`` for ``cfg.teacher`` (online or remote)."""
    gcfg, source = cfg.generate, cfg.teacher.source
    if source == "remote":
        from stillroom.datagen.remote_complete import remote_complete

        rcfg = cfg.teacher.remote
        chat = True if gcfg.chat is None else gcfg.chat
        fn, client = remote_complete(rcfg, max_new_tokens=gcfg.max_new_tokens, seed=gcfg.seed,
                                     sampling_temperature=gcfg.sampling_temperature, top_p=gcfg.top_p, chat=chat)
        log(f"teacher: remote {client.shown_base} model {rcfg.model!r}")
        return fn, f"remote:{client.shown_base}#{rcfg.model}", chat, client.close
    if source != "online":
        raise ConfigError(f"teacher.source={source} cannot generate text; use online (teacher.model) or remote")
    import torch

    from stillroom.models import load_model
    from stillroom.datagen.complete import hf_complete_fn
    from stillroom.models.precision import weights_dtype

    dtype = weights_dtype(cfg.teacher.dtype, cfg.teacher.device)
    loaded = load_model(cfg.teacher.model, dtype=dtype,
                        cache_dir=cfg.cache_dir)
    model = loaded.model.to(cfg.teacher.device).eval()
    tok = loaded.tokenizer
    chat = bool(getattr(tok, "chat_template", None)) if gcfg.chat is None else gcfg.chat
    fn = hf_complete_fn(model, tok, sampling_temperature=gcfg.sampling_temperature, top_p=gcfg.top_p,
                        max_new_tokens=gcfg.max_new_tokens, seed=gcfg.seed, use_chat_template=chat)
    log(f"teacher: {loaded.identity} ({dtype} on {cfg.teacher.device}, chat template {'on' if chat else 'off'})")
    return fn, loaded.identity, chat, lambda: None


def _with_progress(fn: CompleteFn, total_prompts: int, log: Log) -> CompleteFn:
    done, t0 = [0], time.perf_counter()

    def call(prompts: list[str], n: int) -> list[list[str]]:
        out = fn(prompts, n)
        done[0] += len(prompts)
        log(f"  {done[0]}/{total_prompts} prompts ({time.perf_counter() - t0:.1f}s)")
        return out

    return call


# ----------------------------------------------------------------------------- the command


def run_generate(
    cfg: RunConfig,
    *,
    export_only: bool = False,
    complete_fn: CompleteFn | None = None,
    teacher_id: str | None = None,
    log: Log = _stderr,
) -> dict:
    """Generate into the store (unless ``export_only``), then summarise and export; returns the summary.

    ``complete_fn``/``teacher_id`` replace the configured teacher (tests, custom backends). The summary is
    also written to ``<store>.summary.json``.
    """
    gcfg = cfg.generate
    items = load_items(gcfg)
    _check_inputs(items, gcfg)
    verifier = _verifier(gcfg)
    path = store_path(cfg)
    out_path = export_path(cfg)
    gen_stats = None
    t0 = time.perf_counter()
    if not export_only:
        close = lambda: None  # noqa: E731
        if complete_fn is None:
            complete_fn, teacher_id, chat, close = build_teacher(cfg, log)
        else:
            chat = bool(gcfg.chat)
            teacher_id = teacher_id or "custom"
        try:
            with GenerationStore(path) as store:
                log(f"generate: {len(items)} prompts x {gcfg.n_samples} samples -> {path} "
                    f"({len(store)} samples already stored)")
                gen_stats = generate_with(
                    _with_progress(complete_fn, len(items), log), items, template=gcfg.template,
                    n_samples=gcfg.n_samples, batch_size=gcfg.batch_size, store=store, teacher_id=teacher_id,
                    settings=generation_settings(gcfg, chat), on_error=gcfg.on_error, id_field=gcfg.id_field,
                    allow_mixed_settings=gcfg.allow_mixed_settings,
                    max_failed_calls_in_a_row=gcfg.max_failed_calls_in_a_row,
                )
        finally:
            close()
    elif not path.is_file():
        raise ConfigError(f"--export-only: the generation store {path} does not exist; run `stillroom generate` first")
    with GenerationStore(path, read_only=True) as store:
        records = store.read()
        teachers = store.teacher_settings()
    rows, ex_stats = export_rows(items, records, gcfg, verifier)
    if out_path is not None:
        write_jsonl_atomic(out_path, rows)
    summary = {
        "store": str(path),
        "mode": gcfg.mode,
        "teachers": teachers,
        "prompts": len(items),
        "n_samples": gcfg.n_samples,
        "samples_expected": len(items) * gcfg.n_samples,
        "samples_stored": ex_stats["samples"],
        "samples_missing": ex_stats["missing_samples"],
        "generated_now": gen_stats["samples_written"] if gen_stats else 0,
        "already_stored": gen_stats["samples_skipped"] if gen_stats else ex_stats["samples"],
        "malformed": ex_stats["malformed"],
        "malformed_total": sum(ex_stats["malformed"].values()),
        "verifier": None if verifier is None else {"spec": gcfg.verifier, **ex_stats["verifier"]},
        "rationale_parse": ex_stats["rationale_parse"],
        "export": None if out_path is None else {
            "path": str(out_path),
            **{k: ex_stats[k] for k in ("format", "rows", "rows_teacher", "rows_original", "prompts_without_rows",
                                        "dropped_parse_failures")},
            "keep": gcfg.export.keep,
        },
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(path.with_name(path.name + ".summary.json"), summary)
    log(summary_line(summary))
    return summary


def summary_line(s: dict) -> str:
    """One human line: what is in the store, what was malformed, verified, parsed and exported."""
    parts = [f"generate: {s['prompts']} prompts x {s['n_samples']}: {s['samples_stored']}/{s['samples_expected']} "
             f"samples stored ({s['generated_now']} now, {s['already_stored']} before)"]
    bad = ", ".join(f"{k} {v}" for k, v in s["malformed"].items())
    parts.append(f"malformed {s['malformed_total']}" + (f" ({bad})" if bad else ""))
    if s["verifier"]:
        v = s["verifier"]
        parts.append(f"verified {v['passed']}/{v['passed'] + v['failed']}"
                     + (f" ({v['raised']} verifier exceptions, first: {v['first_exception']})" if v["raised"] else ""))
    if s["rationale_parse"] is not None:
        p = s["rationale_parse"]
        parts.append(f"rationale parse failures {p.get('failed', 0)}/{p.get('ok', 0) + p.get('failed', 0)}")
    if s["export"]:
        e = s["export"]
        parts.append(f"exported {e['rows']} rows ({e['rows_teacher']} teacher, {e['rows_original']} original) "
                     f"-> {e['path']}")
    return "; ".join(parts)
