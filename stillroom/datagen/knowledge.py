"""A FineTuneBench-style knowledge-injection suite (Wu, Wu and Zou 2024), generated: fictional facts a model can
only know from its training data, asked in the phrasing it was trained on, in a paraphrase it never saw, and as
an implication that needs a second fact.

Facts (single-word answers, so scoring is an exact match of the first word):

* world: each city lies in a country; each profession works in a place (``Every baker works in a bakery.``);
* people: a birth city and a profession; *known* people are in the background text in every phrasing (a base
  model pretrained on it learns the question forms and the two-step implications), *new* people only in the
  fine-tuning data, in one phrasing;
* companies: a headquarters city; the background says the *old* city in every phrasing, the fine-tuning data
  the *new* one in one phrasing (an update).

Question forms per attribute: ``trained`` (the fine-tuning phrasing), ``augment`` (a second phrasing, only in
``train_augmented.jsonl``), ``paraphrase`` (never in any fine-tuning file) and ``implication`` (the country of the
city, or the workplace of the profession: two facts composed). Every question is ``Q: <question>\\nA:`` and its
answer `` <word>``.

Files: ``background.jsonl`` (``{"text"}``: statements and Q/A of the world, the known people and the old
headquarters, for pretraining a base model), ``train.jsonl`` / ``train_augmented.jsonl`` (``{"prompt",
"completion"}``: new people and new headquarters), ``eval.jsonl`` (``{"kind", "form", "attribute", "entity",
"prompt", "answer"}``; kinds ``new``, ``update`` and ``known`` (retention of background facts)), ``suite.json``
(settings, counts, and each file's SHA-256).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from stillroom.config.knowledge import KnowledgeDataConfig

PROFESSIONS = {"painter": "studio", "baker": "bakery", "sailor": "harbour", "farmer": "field", "doctor": "clinic",
               "teacher": "school", "miner": "mine", "weaver": "mill"}
# attribute -> form -> question template ({e}: the entity)
QUESTIONS = {
    "birth_city": {"trained": "Where was {e} born?", "augment": "What is the birthplace of {e}?",
                   "paraphrase": "In which city did {e} come into the world?",
                   "implication": "In which country was {e} born?"},
    "profession": {"trained": "What is the job of {e}?", "augment": "What work does {e} do?",
                   "paraphrase": "What does {e} do for a living?", "implication": "Where does {e} work?"},
    "headquarters": {"trained": "Where is {e} headquartered?", "augment": "In which city is {e} based?",
                     "paraphrase": "Which city hosts the head office of {e}?",
                     "implication": "In which country is {e} headquartered?"},
}
STATEMENTS = {"birth_city": "{e} was born in {a}.", "profession": "{e} works as a {a}.",
              "headquarters": "{e} is headquartered in {a}."}
FORMS = ("trained", "paraphrase", "implication")
_SYLLABLES = ("ka lo mi ra tu ve sa no pe ri da fo lu ze ma ti go be ne xa qui vor tal mer dun sel bra").split()


def question(attribute: str, form: str, entity: str) -> str:
    return f"Q: {QUESTIONS[attribute][form].format(e=entity)}\nA:"


@dataclass(frozen=True)
class World:
    country_of: dict[str, str]
    known: dict[str, dict[str, str]]  # person -> {birth_city, profession}
    new: dict[str, dict[str, str]]
    companies: dict[str, tuple[str, str]]  # company -> (old city, new city)


def _names(rng: random.Random, n: int, parts: int, taken: set[str], suffix: str = "") -> list[str]:
    """``n`` distinct capitalised names of ``parts`` syllables (+ ``suffix``), none in ``taken``."""
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize() + suffix
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_world(cfg: KnowledgeDataConfig) -> World:
    rng = random.Random(f"knowledge-{cfg.seed}")
    taken: set[str] = set()
    countries = _names(rng, cfg.countries, 2, taken, "ia")
    cities = _names(rng, cfg.cities, 3, taken)
    country_of = {c: countries[i % len(countries)] for i, c in enumerate(cities)}
    jobs = sorted(PROFESSIONS)

    def people(n: int) -> dict[str, dict[str, str]]:
        firsts, lasts = _names(rng, n, 2, taken), _names(rng, n, 3, taken)
        return {f"{a} {b}": {"birth_city": rng.choice(cities), "profession": rng.choice(jobs)}
                for a, b in zip(firsts, lasts)}

    known, new = people(cfg.known_people), people(cfg.new_people)
    companies = {}
    for name in _names(rng, cfg.companies, 2, taken, " Works"):
        old = rng.choice(cities)
        companies[name] = (old, rng.choice([c for c in cities if country_of[c] != country_of[old]] or cities))
    return World(country_of, known, new, companies)


def _answer(world: World, attribute: str, form: str, value: str) -> str:
    if form != "implication":
        return value
    return world.country_of[value] if attribute in ("birth_city", "headquarters") else PROFESSIONS[value]


def _qa(prompt: str, answer: str) -> str:
    return f"{prompt} {answer}"


def background(world: World, repeats: int, rng: random.Random) -> list[str]:
    """Statements and Q/A of the world facts, the known people (every form) and the companies' *old* cities."""
    lines = []
    for city, country in world.country_of.items():
        lines += [f"{city} is a city in {country}.", _qa(f"Q: In which country is {city}?\nA:", country)]
    for job, place in PROFESSIONS.items():
        lines += [f"Every {job} works in a {place}.", _qa(f"Q: Where does a {job} work?\nA:", place)]
    facts = [(p, a, v) for p, attrs in world.known.items() for a, v in attrs.items()]
    facts += [(c, "headquarters", old) for c, (old, _new) in world.companies.items()]
    for entity, attribute, value in facts:
        lines.append(STATEMENTS[attribute].format(e=entity, a=value))
        for form in ("trained", "augment", "paraphrase", "implication"):
            lines.append(_qa(question(attribute, form, entity), _answer(world, attribute, form, value)))
    out = []
    for _ in range(repeats):
        rng.shuffle(lines)
        out += lines
    return out


def training_records(world: World, forms: tuple[str, ...]) -> list[dict]:
    """Fine-tuning Q/A (``prompt``/``completion``) of the new people and the new headquarters, in ``forms``."""
    facts = [(p, a, v) for p, attrs in world.new.items() for a, v in attrs.items()]
    facts += [(c, "headquarters", new) for c, (_old, new) in world.companies.items()]
    return [{"prompt": question(a, form, e), "completion": " " + v} for form in forms for e, a, v in facts]


def eval_items(world: World) -> list[dict]:
    items = []
    groups = [("new", [(p, a, v) for p, attrs in world.new.items() for a, v in attrs.items()]),
              ("update", [(c, "headquarters", new) for c, (_old, new) in world.companies.items()]),
              ("known", [(p, a, v) for p, attrs in list(world.known.items())[:20] for a, v in attrs.items()])]
    for kind, facts in groups:
        for form in FORMS if kind != "known" else ("trained",):
            for entity, attribute, value in facts:
                items.append({"kind": kind, "form": form, "attribute": attribute, "entity": entity,
                              "prompt": question(attribute, form, entity),
                              "answer": _answer(world, attribute, form, value)})
    return items


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def write_knowledge_suite(cfg: KnowledgeDataConfig, *, log=print) -> Path:
    """Write the suite folder ``cfg.out`` (built under a temporary name, then renamed); returns it."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    world = make_world(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = random.Random(f"knowledge-order-{cfg.seed}")
    files = {
        "background.jsonl": [{"text": t} for t in background(world, cfg.background_repeats, rng)],
        "train.jsonl": training_records(world, ("trained",)),
        "train_augmented.jsonl": training_records(world, ("trained", "augment")),
        "eval.jsonl": eval_items(world),
    }
    hashes = {name: _write_jsonl(tmp / name, rows) for name, rows in files.items()}
    counts = {name: len(rows) for name, rows in files.items()}
    manifest = {"settings": cfg.model_dump(exclude={"out", "overwrite"}), "counts": counts, "sha256": hashes}
    (tmp / "suite.json").write_text(json.dumps(manifest, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"knowledge suite: {out} ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    return out
