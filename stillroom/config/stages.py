"""A multi-stage recipe: a top-level ``stages:`` list run in order by ``stillroom run RECIPE``.

Each stage is one command of stillroom: ``run`` (a training run), ``prune`` (``stillroom prune``), ``merge``
(SLERP, ``stillroom merge``) or ``transfer`` (diff vectors, ``stillroom transfer``). A later stage takes an
earlier one's model through the placeholders ``{stage:NAME}`` (that stage's output model folder) and
``{previous}`` (the stage just before), allowed in any string of the stage. Outputs: a run stage's
``<its run folder>/student``, a prune stage's pruned folder, a merge or transfer stage's ``out``.

Everything is resolved and validated when the recipe loads (:func:`load_stages`): every stage's full config,
every placeholder (an unknown, later or own stage is an error), so a bad stage 3 fails before stage 1 runs,
naming ``stages[i] (NAME)`` and the key. See docs/stages.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from stillroom.config.commands import MergeConfig
from stillroom.config.core import Strict
from stillroom.config.load import ConfigError, apply_override, config_from_tree, parse_override
from stillroom.config.schema import RunConfig
from stillroom.config.transfer import TransferConfig

StageKind = Literal["run", "prune", "merge", "transfer"]
PLACEHOLDER = re.compile(r"\{(previous|stage:([^{}]*))\}")
"""``{previous}`` or ``{stage:NAME}`` inside a string; other braces (``{output_dir}``) are left alone."""
MODEL_KINDS = ("run", "prune")
"""Stage kinds whose content is a full RunConfig tree (``recipe`` + ``overrides``)."""


class Stage(Strict):
    """One stage: its name, its kind and the content of that kind (only that one)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Unique stage name; also its folder name under <output_dir>/<name>/.")
    kind: StageKind = Field(description="run: train (stillroom run); prune: stillroom prune (the `prune:` section); "
                            "merge: SLERP two models (stillroom merge); transfer: new_base + scale * (fine_tuned - "
                            "base) (stillroom transfer).")
    folder: str | None = Field(
        None, description="The stage's folder (run stage: its run folder; merge/transfer: the output model folder; "
        "prune: the run folder holding `pruned/` unless prune.out is set). Default <output_dir>/<name>/<stage name>.")
    recipe: str | dict[str, Any] | None = Field(
        None, description="run/prune: the stage's recipe, inline (a mapping of sections) or a path to a recipe "
        "file (relative to this file's folder, or a shipped recipe's name); merged over `defaults`. Its name and "
        "output_dir are replaced by the stage's folder.")
    overrides: list[str] = Field(default_factory=list,
                                 description="run/prune: key.sub=value overrides applied on top of `recipe`.")
    merge: dict[str, Any] | None = Field(
        None, description="merge: a MergeConfig (a, b, t, out; out defaults to the stage folder).")
    transfer: dict[str, Any] | None = Field(
        None, description="transfer: a TransferConfig (fine_tuned, base, new_base, scale, out; out defaults to the "
        "stage folder).")

    @model_validator(mode="after")
    def _content_matches_kind(self) -> "Stage":
        given = {"recipe": self.recipe is not None or bool(self.overrides), "merge": self.merge is not None,
                 "transfer": self.transfer is not None}
        wanted = "recipe" if self.kind in MODEL_KINDS else self.kind
        wrong = [k for k, v in given.items() if v and k != wanted]
        if wrong:
            raise ValueError(f"a {self.kind} stage takes `{wanted}`, not {', '.join(f'`{k}`' for k in wrong)}")
        if self.kind in ("merge", "transfer") and not given[wanted]:
            raise ValueError(f"a {self.kind} stage needs its `{wanted}:` settings")
        return self


class StagesConfig(Strict):
    """The top level of a multi-stage recipe."""

    name: str = Field("stages", description="Folder name of the whole pipeline under `output_dir`.")
    output_dir: str = Field("runs", description="Folder of run folders (`~` is expanded).")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Sections merged under every run/prune stage's recipe (the stage's own "
        "values win), e.g. teacher, data, train, eval shared by all stages.")
    stages: list[Stage] = Field(min_length=1, description="The stages, run in this order.")

    @model_validator(mode="after")
    def _unique_names(self) -> "StagesConfig":
        seen: set[str] = set()
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages[{i}]: the stage name {stage.name!r} is used twice; stage names are unique")
            seen.add(stage.name)
        return self

    @property
    def root(self) -> Path:
        """``<output_dir>/<name>``: the stage folders, ``stages.json`` and ``stages.md``."""
        return Path(self.output_dir).expanduser() / self.name


@dataclass
class PlannedStage:
    """A stage with everything resolved: its validated config, its output model folder and its fingerprint
    (the config's hash chained with the earlier stages', so any change upstream changes it)."""

    index: int
    name: str
    kind: str
    folder: Path
    config: RunConfig | MergeConfig | TransferConfig
    output: Path
    uses: list[str] = field(default_factory=list)  # earlier stages whose outputs this stage reads
    fingerprint: str = ""

    @property
    def label(self) -> str:
        return f"stages[{self.index}] ({self.name})"


@dataclass
class StagesPlan:
    config: StagesConfig
    stages: list[PlannedStage]
    origin: str

    @property
    def root(self) -> Path:
        return self.config.root


def read_yaml(path: Path) -> Any:
    """``yaml.safe_load`` of a file, with the file and line in the error."""
    if not path.is_file():
        raise ConfigError(f"recipe `{path}` not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc


def is_stages_recipe(path: str | Path | None) -> bool:
    """Whether the recipe file has a top-level ``stages:`` list (then ``stillroom run`` runs its stages)."""
    if not path or not Path(path).is_file():
        return False
    loaded = read_yaml(Path(path))
    return isinstance(loaded, dict) and "stages" in loaded


def load_stages(path: str | Path, overrides: list[str] = ()) -> StagesPlan:
    """Read, resolve and validate a multi-stage recipe; see the module docstring. Overrides: ``name=``,
    ``output_dir=``, ``defaults.KEY=`` (under every run/prune stage) and ``stages.NAME.KEY=`` (a run/prune
    stage: one more override ``KEY=``; a merge/transfer stage: its setting ``KEY``)."""
    path = Path(path)
    tree = read_yaml(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with `stages:`")
    _apply_overrides(tree, overrides, path)
    try:
        cfg = StagesConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format(err, f"{path}: invalid multi-stage recipe", "", tree)) from None
    planned: list[PlannedStage] = []
    for i, stage in enumerate(cfg.stages):
        planned.append(_plan_stage(cfg, i, stage, planned, path))
    chain = ""
    for p in planned:
        chain = hashlib.sha256((chain + _config_json(p.config)).encode()).hexdigest()
        p.fingerprint = chain
    return StagesPlan(cfg, planned, str(path))


def _apply_overrides(tree: dict, overrides: list[str], path: Path) -> None:
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] != "stages":
            apply_override(tree, parts, value, text)
            continue
        stages = [s for s in tree.get("stages") or [] if isinstance(s, dict)]
        stage = next((s for s in stages if len(parts) > 2 and s.get("name") == parts[1]), None)
        if stage is None:
            names = [s.get("name") for s in stages]
            raise ConfigError(f"override `{text}`: write stages.NAME.key=value with NAME one of {names} ({path})")
        kind, rest = stage.get("kind"), parts[2:]
        if kind in MODEL_KINDS:
            stage.setdefault("overrides", []).append(f"{'.'.join(rest)}={text.split('=', 1)[1]}")
        else:
            apply_override(stage.setdefault(kind, {}), rest, value, text)


def _plan_stage(cfg: StagesConfig, i: int, stage: Stage, earlier: list[PlannedStage], path: Path) -> PlannedStage:
    label = f"{path}: stages[{i}] ({stage.name})"
    folder = Path(stage.folder).expanduser() if stage.folder else cfg.root / stage.name
    outputs = {p.name: str(p.output) for p in earlier}
    uses: list[str] = []
    if stage.kind in MODEL_KINDS:
        base = _recipe_tree(stage.recipe, path, label)
        tree = _deep_merge(copy.deepcopy(cfg.defaults), base)
        tree["name"], tree["output_dir"] = folder.name, str(folder.parent)
        tree = _resolve(tree, outputs, label, uses)
        overrides = [_resolve(o, outputs, label, uses) for o in stage.overrides]
        run_cfg = config_from_tree(tree, overrides, label)
        if run_cfg.run_dir != folder:  # an override of name/output_dir would move the stage away from its record
            raise ConfigError(f"{label}: set the stage's folder with `folder:`, not with name= or output_dir=")
        return PlannedStage(i, stage.name, stage.kind, folder, run_cfg, _model_output(stage.kind, run_cfg, label),
                            sorted(set(uses)))
    settings = _resolve({"out": str(folder), **getattr(stage, stage.kind)}, outputs, label, uses)
    model = MergeConfig if stage.kind == "merge" else TransferConfig
    try:
        command_cfg = model.model_validate(settings)
    except ValidationError as err:
        raise ConfigError(_format(err, f"{label}: invalid {stage.kind} settings", f"{stage.kind}.")) from None
    return PlannedStage(i, stage.name, stage.kind, Path(command_cfg.out).expanduser(), command_cfg,
                        Path(command_cfg.out).expanduser(), sorted(set(uses)))


def _model_output(kind: str, cfg: RunConfig, label: str) -> Path:
    """A run stage's student folder, or a prune stage's pruned folder (``prune.out``, default
    ``<run folder>/pruned``)."""
    if kind == "run":
        return cfg.run_dir / "student"
    prune = getattr(cfg, "prune", None)
    if prune is None:
        raise ConfigError(f"{label}: this stillroom has no `prune:` section (stillroom prune); use a run stage")
    return Path(prune.out).expanduser() if prune.out else cfg.run_dir / "pruned"


def _recipe_tree(recipe: str | dict | None, path: Path, label: str) -> dict:
    """The stage's recipe mapping: inline, or read from a file (next to the stages recipe, as given, or a
    shipped recipe's name)."""
    if recipe is None:
        return {}
    if isinstance(recipe, dict):
        return copy.deepcopy(recipe)
    from importlib import resources

    shipped = Path(str(resources.files("stillroom") / "recipes" / f"{recipe}.yaml"))
    candidates = [path.parent / recipe, Path(recipe).expanduser(), shipped]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"{label}: recipe `{recipe}` not found (looked in {', '.join(map(str, candidates[:2]))} "
                          "and the shipped recipes)")
    loaded = read_yaml(found) or {}
    if not isinstance(loaded, dict) or "stages" in loaded:
        raise ConfigError(f"{label}: recipe `{found}` must be a single-run recipe (a mapping of sections, no stages)")
    return loaded


ATOMIC_KEYS = ("model",)
"""Mappings a stage replaces whole instead of merging into ``defaults`` (a model source holds exactly one of
path / builtin / gguf: a stage's ``{builtin: ...}`` must not keep the defaults' ``path``)."""


def _deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key (except :data:`ATOMIC_KEYS`), anything else in ``top``
    replaces ``base``'s."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key not in ATOMIC_KEYS:
            base[key] = _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _resolve(value: Any, outputs: dict[str, str], label: str, uses: list[str]) -> Any:
    """``value`` with every ``{previous}`` / ``{stage:NAME}`` replaced by that earlier stage's output folder."""
    if isinstance(value, dict):
        return {k: _resolve(v, outputs, label, uses) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, outputs, label, uses) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name = match.group(2) if match.group(2) is not None else None
        if name is None:  # {previous}
            if not outputs:
                raise ConfigError(f"{label}: `{{previous}}` in the first stage names no stage")
            name = list(outputs)[-1]
        if name not in outputs:
            raise ConfigError(f"{label}: `{match.group(0)}` names no earlier stage (earlier stages: "
                              f"{', '.join(outputs) or 'none'}); a stage can use only the outputs of stages before it")
        uses.append(name)
        return outputs[name]

    return PLACEHOLDER.sub(one, value)


def config_tree(cfg: RunConfig | MergeConfig | TransferConfig) -> dict:
    """What a stage's fingerprint covers: the settings that differ from their defaults (so a newer stillroom
    that adds a setting does not change it), without ``overwrite`` (the command line sets it; no result
    depends on it)."""
    tree = cfg.model_dump(mode="json", exclude_defaults=True)
    tree.pop("overwrite", None)
    if isinstance(tree.get("prune"), dict):
        tree["prune"].pop("overwrite", None)
    return tree


def _config_json(cfg: RunConfig | MergeConfig | TransferConfig) -> str:
    return json.dumps(config_tree(cfg), sort_keys=True)


def _format(err: ValidationError, head: str, prefix: str, tree: dict | None = None) -> str:
    """Pydantic's errors, one line each, keys dotted; ``stages.2.x`` reads ``stages[2] (NAME).x``."""
    lines = [head]
    for e in err.errors():
        loc = list(e["loc"])
        if tree is not None and len(loc) > 1 and loc[0] == "stages" and isinstance(loc[1], int):
            stages = tree.get("stages") or []
            name = stages[loc[1]].get("name") if loc[1] < len(stages) and isinstance(stages[loc[1]], dict) else None
            loc = [f"stages[{loc[1]}] ({name})"] + loc[2:]
        dotted = prefix + ".".join(str(p) for p in loc)
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  `{dotted or '<top level>'}`: {msg}")
    return "\n".join(lines)
