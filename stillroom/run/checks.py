"""What can be checked about a run before any model loads (``stillroom validate`` and the start of every run).

Beyond the config's own validators, :func:`check_run` looks at the files and settings a run will need:

* the method works in the recipe's domain;
* every ``data.sources[].path`` is a readable kind of file that exists (a ``dataset`` that can only be a
  local folder exists);
* every local model folder or GGUF file exists: ``teacher.model``, ``student.model``, online ensemble
  members' ``model``, and for ``stillroom validate`` ``select.reference``; a ``path`` that is not there is a hub id only when it has a
  hub id's shape (:func:`stillroom.models.load.local_reason`);
* the teacher source has what it needs: ``remote`` an http(s) ``teacher.remote.url``, ``ensemble``
  members (each checked by these rules; a store member its ``store.path``), ``store`` a readable manifest
  when the store exists (when it does not, ``stillroom cache-teacher`` writes it: a note, not an error);
* the loss terms can be fed by the source: dense-only terms (``taid``) need the online teacher, hidden-state
  and attention terms a single teacher with those states (attention: the online teacher only);
* the classifier domain's ``classifier.teacher.path`` exists;
* ``eval.knowledge``, when set, is a readable knowledge-injection suite (scored after training too).
* ``eval.lm_eval``, when set: not a vlm run, lm-evaluation-harness installed, ``include_path`` a folder, every
  task known.

Every problem found is reported at once in one :class:`~stillroom.config.load.ConfigError` (exit 2), each
line naming its key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from stillroom.config.load import ConfigError
from stillroom.config.schema import RunConfig, TeacherConfig
from stillroom.methods import METHODS, Method


def check_run(cfg: RunConfig, *, log: Callable[[str], None] | None = None, all_commands: bool = False,
              cache_command: str | None = None) -> Method:
    """What can be checked without loading a model, beyond the config's own validators; returns the method.

    Raises :class:`ConfigError` listing every problem; ``log`` gets the notes (where a store will be read);
    ``all_commands``: also what only other commands read (``select.reference``), as ``stillroom validate`` does;
    ``cache_command``: the full ``stillroom cache-teacher`` command of this recipe, for the notes.
    """
    method = METHODS[cfg.method]
    if method.domains is not None and cfg.domain not in method.domains:
        raise ConfigError(f"method {cfg.method!r} works in the {', '.join(method.domains)} domain(s), not in "
                          f"domain {cfg.domain!r}; set domain: {method.domains[0]} or choose another method")
    problems: list[str] = []
    notes: list[str] = []
    if cfg.domain == "lm":
        _check_data(cfg, problems)
        _check_model(cfg.teacher.model, "teacher.model", problems)
        if cfg.student.model is not None:
            _check_model(cfg.student.model, "student.model", problems)
        if _uses_teacher(cfg, method):
            _check_source(cfg, cfg.teacher, "teacher", problems, notes)
            notes = [n.replace(_CACHE, f"`{cache_command}`") for n in notes] if cache_command else notes
            _check_terms(cfg, problems)
        if all_commands and cfg.select.reference is not None:
            _check_model(cfg.select.reference, "select.reference", problems)
        if cfg.eval.knowledge:  # read after training too: a bad suite must not cost the run
            from stillroom.eval.knowledge import load_items

            try:
                load_items(cfg.eval.knowledge)
            except (OSError, ValueError) as err:
                problems.append(str(err) if str(err).startswith("eval.knowledge") else f"eval.knowledge: {err}")
        if cfg.eval.lm_eval is not None:  # the extra installed, the task names known, before any model loads
            from stillroom.eval.harness import check_lm_eval

            problems += check_lm_eval(cfg.eval.lm_eval) if cfg.vlm is None else [
                "eval.lm_eval: the harness scores text-only models; a vlm run's models read images: remove eval.lm_eval"]
    if cfg.train.parallel == "fsdp" and cfg.baseline and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("baseline: true with train.parallel=fsdp under several processes: the baseline would train a "
                        "copy of an already sharded student; set baseline: false, or run the baseline as a run of its own")
    classifier = getattr(cfg, "classifier", None)
    for path, key, hint in _image_model_folders(cfg):
        if not Path(path).expanduser().is_dir():
            from stillroom.models.load import missing_path_message

            problems.append(missing_path_message(path, key, hint=hint))
    if cfg.domain == "classifier" and classifier is not None and classifier.teacher_source == "store" \
            and _uses_teacher(cfg, method):
        from stillroom.domains.vision.soft_labels import store_folder

        _check_store_folder(store_folder(cfg), "classifier", problems, notes)
        notes = [n.replace(_CACHE, f"`{cache_command}`") for n in notes] if cache_command else notes
    if problems:
        raise ConfigError("this run cannot start:\n" + "\n".join(f"  - {p}" for p in problems))
    for note in notes if log is not None else ():
        log(note)
    return method


_CACHE = "`stillroom cache-teacher` with this recipe and overrides"
_TRAIN_HERE = "check the path, or leave it null to train the teacher here"


def _image_model_folders(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """``(path, key, hint)`` of every model folder an image run loads (teachers, a student to start from)."""
    if cfg.domain == "classifier":
        sec = cfg.classifier
        teachers = [(sec.teacher, "classifier.teacher")] if not sec.teachers else \
            [(t, f"classifier.teachers[{i}]") for i, t in enumerate(sec.teachers)]
        found = [(t.path, f"{key}.path", _TRAIN_HERE) for t, key in teachers if t.path is not None]
        if sec.student_path is not None:
            found.append((sec.student_path, "classifier.student_path", "check the path (a saved classifier folder, "
                          "e.g. runs/<name>/student), or run the recipe that writes it first"))
        return found
    if cfg.domain == "mae":
        sec, first = cfg.mae, "run the recipe that writes it first (e.g. mae_pretrain_digits)"
        return [(p, key, hint) for p, key, hint in (
            (sec.teacher.path, "mae.teacher.path", _TRAIN_HERE),
            (sec.teacher.init_path, "mae.teacher.init_path", f"check the path, or {first}"),
            (sec.student_path, "mae.student_path", f"check the path, or {first}")) if p is not None]
    return []


def _uses_teacher(cfg: RunConfig, method: Method) -> bool:
    """Whether training reads the teacher source (``sft`` and CE-only recipes do not)."""
    from stillroom.losses import get_term

    return not method.ce_only and any(get_term(t.name).uses_teacher for t in cfg.loss.terms)


def _check_data(cfg: RunConfig, problems: list[str]) -> None:
    from stillroom.data.readers import SUFFIXES
    from stillroom.models.load import local_reason

    for i, src in enumerate(cfg.data.sources):
        key = f"data.sources[{i}]"
        if src.path is not None:
            path = Path(src.path)
            if not path.exists():
                problems.append(f"{key}.path: no such file: {src.path} (resolved to {path.resolve()}); check the "
                                "path (a relative path is read from the folder stillroom runs in)")
            elif path.is_dir():
                problems.append(f"{key}.path: {src.path} is a folder; use {key}.dataset for a dataset folder")
            elif path.suffix.lower() not in SUFFIXES:
                problems.append(f"{key}.path: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")
        elif src.dataset is not None and not Path(src.dataset).expanduser().exists() and local_reason(src.dataset):
            problems.append(f"{key}.dataset: no such folder: {src.dataset} (resolved to "
                            f"{Path(src.dataset).expanduser().resolve()}), and it is not a hub data set name "
                            f"({local_reason(src.dataset)}); check the path")


def _check_model(src, key: str, problems: list[str]) -> None:
    from stillroom.models.load import model_problem

    problem = model_problem(src, key)
    if problem is not None:
        problems.append(problem)


def _check_source(cfg: RunConfig, tcfg: TeacherConfig, where: str, problems: list[str], notes: list[str]) -> None:
    """The needs of ``tcfg.source`` (``where``: ``teacher`` or ``teacher.ensemble.N``)."""
    source = tcfg.source
    if source == "remote":
        url = tcfg.remote.url
        if not url:
            problems.append(f"{where}.remote.url is not set: {where}.source=remote needs the server's base URL, "
                            f"e.g. {where}.remote.url=http://127.0.0.1:8000/v1")
        elif not url.startswith(("http://", "https://")):
            problems.append(f"{where}.remote.url must be an http(s) URL such as http://127.0.0.1:8000/v1 (got "
                            f"{url!r})")
    elif source == "ensemble":
        if not tcfg.ensemble:
            problems.append(f"{where}.ensemble is empty: {where}.source=ensemble needs a list of member teachers, "
                            f"e.g. {where}.ensemble=[{{source: online, model: {{path: ./teacher-a}}}}, ...]")
        for i, member in enumerate(tcfg.ensemble):
            key = f"{where}.ensemble.{i}"
            if member.source == "online" and member.model != cfg.teacher.model:
                _check_model(member.model, f"{key}.model", problems)
            if member.source == "store" and not member.store.path:
                problems.append(f"{key}.store.path is required for a store member of an ensemble")
            _check_source(cfg, member, key, problems, notes)
    elif source == "store" and (where == "teacher" or tcfg.store.path):
        _check_store(cfg, tcfg, where, problems, notes)


def _check_store(cfg: RunConfig, tcfg: TeacherConfig, where: str, problems: list[str], notes: list[str]) -> None:
    from stillroom.teachers.factory import store_path

    _check_store_folder(store_path(cfg) if where == "teacher" else Path(tcfg.store.path).expanduser(), where,
                        problems, notes)


def _check_store_folder(folder: Path, where: str, problems: list[str], notes: list[str]) -> None:
    """A store ``where`` reads in ``folder``: a readable manifest if it exists (a note says what it holds), or
    a note that ``stillroom cache-teacher`` writes it."""
    from stillroom.teachers.store_format import StoreError, read_manifest

    if not (folder / "manifest.json").exists():
        notes.append(f"{where}: the run will read the teacher store in {folder}, not written yet: `stillroom "
                     "cache-teacher` with this recipe and overrides writes it")
        return
    try:
        manifest = read_manifest(folder)
    except StoreError as err:
        problems.append(f"{where}.store: {err}")
        return
    state = "complete" if manifest.get("complete") else "incomplete (`stillroom cache-teacher` resumes it)"
    notes.append(f"{where}: the run will read the teacher store in {folder} ({state}; k={manifest.get('k')}, "
                 f"{manifest.get('logprob_dtype')}, {manifest.get('tokens')} positions)")


def _check_terms(cfg: RunConfig, problems: list[str]) -> None:
    """Loss terms that the teacher source cannot feed."""
    from stillroom.losses import get_term

    source = cfg.teacher.source
    for i, term in enumerate(cfg.loss.terms):
        spec = get_term(term.name)
        key = f"loss.terms[{i}] ({term.name})"
        if not spec.uses_teacher:
            continue
        # (a cross-tokenizer store or remote teacher hands CrossTargets, which every logit term reads)
        if "dense_teacher" in spec.needs and source in ("store", "remote") and cfg.teacher.tokenizer_mode != "cross":
            problems.append(f"{key} needs the teacher's dense logits, but teacher.source={source} gives top-k "
                            "log-probabilities; use teacher.source=online or another term")
        elif spec.kind == "hidden" and source in ("remote", "ensemble"):
            problems.append(f"{key} needs the teacher's hidden states, which teacher.source={source} does not give; "
                            "use teacher.source=online, or store (it keeps the layers the terms need)")
        elif spec.kind == "attention" and source != "online":
            problems.append(f"{key} needs the teacher's attention maps, which only teacher.source=online gives")
