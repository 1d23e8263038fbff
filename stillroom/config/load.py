"""Load a recipe: YAML (safe_load) + ``a.b=c`` overrides -> validated :class:`RunConfig`.

Errors name the file, the dotted key and, for unknown keys, the nearest valid one.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from stillroom.config.schema import DOMAINS, LM_SECTIONS, METHODS, RunConfig


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says how to fix it."""


def _fields_at(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Valid field names of the sub-model reached by ``path`` (empty if unknown)."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _inner_model(annotation: Any) -> Any:
    """Unwrap Optional[...] / list[...] to the BaseModel inside, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid config"]
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            valid = _fields_at(RunConfig, loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean `{'.'.join(str(p) for p in loc[:-1] + (near[0],))}`?" if near else ""
            lines.append(f"  unknown key `{dotted}`{hint} (valid here: {', '.join(valid)})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            given = f" (got {e.get('input')!r})" if loc else ""
            lines.append(f"  `{dotted or '<recipe>'}`: {msg}{given}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override `{text}` must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override `{text}` has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override `{text}`: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_override(tree: dict, parts: list[str], value: Any, text: str, defaults: dict | None = None) -> None:
    """Set ``tree[parts...] = value``; missing nodes are taken from ``defaults`` (so list
    indices into a default list work) or created empty."""
    node: Any = tree
    fallback: Any = defaults
    for i, part in enumerate(parts[:-1]):
        if isinstance(fallback, dict):
            fallback = fallback.get(part)
        elif isinstance(fallback, list) and part.isdigit() and int(part) < len(fallback):
            fallback = fallback[int(part)]
        else:
            fallback = None
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError) as exc:
                raise ConfigError(f"override `{text}`: `{'.'.join(parts[: i + 1])}` is not a valid list index") from exc
            continue
        if part not in node or node[part] is None:
            node[part] = copy.deepcopy(fallback) if isinstance(fallback, (dict, list)) else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"override `{text}`: `{last}` is not a valid list index") from exc
    else:
        node[last] = value


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe (or start from defaults) and apply overrides; validate strictly."""
    origin = str(recipe) if recipe else "<defaults>"
    tree: dict = {}
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe `{path}` not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (teacher, student, data, ...)")
        tree = loaded
    return config_from_tree(tree, overrides, origin)


def config_from_tree(tree: dict, overrides: list[str] = (), origin: str = "<recipe>") -> RunConfig:
    """A recipe's parsed mapping (``tree``, changed in place by the overrides) -> validated :class:`RunConfig`;
    errors start with ``origin``. :func:`load_config` reads a file into it; a multi-stage recipe
    (:mod:`stillroom.config.stages`) calls it once per stage."""
    # Validate the recipe alone first so errors point at the file, then the overrides.
    try:
        defaults = RunConfig.model_validate(tree).model_dump(mode="json")
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value, text, defaults)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, f"{origin} with overrides {list(overrides)}")) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML; sections the run does not use are left out: those of other methods and
    domains (null), and the language-model sections (teacher, student, data) of another domain's run."""
    tree = cfg.model_dump(mode="json")
    unused = [s.method for s in METHODS.values() if s is not None and tree.get(s.method) is None]
    unused += [s.domain for s in DOMAINS.values() if s is not None and tree.get(s.domain) is None]
    if cfg.domain != "lm":
        unused += list(LM_SECTIONS)
    return yaml.safe_dump({k: v for k, v in tree.items() if k not in unused}, sort_keys=False)
