"""The word-problem templates of :mod:`stillroom.data.arithmetic`, by level.

A template draws its numbers from ``rng``, records every step ``a op b = c`` in a
:class:`Steps` (which evaluates it and keeps it integral) and returns the question
text; :class:`Retry` asks the generator for another draw.
"""

from __future__ import annotations

import random
from collections.abc import Callable

_EQ = "<EQ>"  # placeholder in step sentences, replaced by "a op b = c"


_NAMES = [
    ("Tom", "he", "his"), ("Mia", "she", "her"), ("Ravi", "he", "his"), ("Sofia", "she", "her"),
    ("Liam", "he", "his"), ("Aisha", "she", "her"), ("Kenji", "he", "his"), ("Elena", "she", "her"),
    ("Omar", "he", "his"), ("Grace", "she", "her"), ("Lucas", "he", "his"), ("Nadia", "she", "her"),
    ("Diego", "he", "his"), ("Hana", "she", "her"), ("Felix", "he", "his"), ("Zoe", "she", "her"),
    ("Arjun", "he", "his"), ("Chloe", "she", "her"), ("Mateo", "he", "his"), ("Leila", "she", "her"),
    ("Samuel", "he", "his"), ("Priya", "she", "her"), ("Jonas", "he", "his"), ("Amara", "she", "her"),
]
_OBJECTS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards",
            "oranges", "crayons", "buttons", "books", "balloons", "candies", "coins", "beads"]
_CONTAINERS = ["bags", "boxes", "jars", "baskets", "packs", "bowls"]
_VEHICLES = ["train", "bus", "car", "truck", "van", "ferry"]
_ITEMS = [("notebooks", "notebook"), ("sandwiches", "sandwich"), ("tickets", "ticket"),
          ("toy cars", "toy car"), ("plants", "plant"), ("scarves", "scarf"), ("mugs", "mug")]
_THINGS = ["bike", "game", "jacket", "backpack", "lamp", "kite", "watch"]
_PEOPLE = ["friends", "classmates", "cousins", "teammates", "neighbors"]
_CROPS = ["tomato", "pepper", "bean", "strawberry"]
_CROP_PLURAL = {"tomato": "tomatoes", "pepper": "peppers", "bean": "beans", "strawberry": "strawberries"}


class Retry(Exception):
    """A template drew numbers it cannot use; draw again from the same RNG."""


def _apply(a: int, op: str, b: int) -> int:
    """Exact integer arithmetic; asserts non-negative integral results."""
    if op == "+":
        c = a + b
    elif op == "-":
        c = a - b
    elif op == "*":
        c = a * b
    elif op == "/":
        assert b != 0 and a % b == 0, f"non-integral division {a} / {b}"
        c = a // b
    else:
        raise AssertionError(f"unknown operator {op!r}")
    assert c >= 0, f"negative intermediate result {a} {op} {b} = {c}"
    return c


class Steps:
    """Collects the rationale: each call evaluates one step and writes its sentence."""

    def __init__(self) -> None:
        self.sentences: list[str] = []
        self.results: list[int] = []

    def do(self, a: int, op: str, b: int, sentence: str) -> int:
        assert _EQ in sentence, sentence
        c = _apply(a, op, b)
        self.sentences.append(sentence.replace(_EQ, f"{a} {op} {b} = {c}"))
        self.results.append(c)
        return c


def _people(rng: random.Random, k: int) -> list[tuple[str, str, str]]:
    return rng.sample(_NAMES, k)


def _split_with_remainder(rng: random.Random, total: int, k: int) -> tuple[int, int]:
    """(each, rest) with ``k * each + rest == total``, ``each >= 2``, ``rest >= 2`` (small)."""
    if total - 2 < k:
        raise Retry
    rest_target = rng.randint(2, max(2, total // 4))
    each = (total - rest_target) // k
    if each < 2:
        raise Retry
    return each, total - k * each


# ----------------------------------------------------------------- level 1: one step

def _l1_buy_more(rng: random.Random, s: Steps) -> str:
    (n, p, _), obj = _people(rng, 1)[0], rng.choice(_OBJECTS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    s.do(a, "+", b, f"{n} starts with {a} {obj} and buys {b} more, so {_EQ} {obj}.")
    return f"{n} has {a} {obj}. At the store, {p} buys {b} more. How many {obj} does {n} have now?"


def _l1_give_away(rng: random.Random, s: Steps) -> str:
    (n, _, _), (m, _, _) = _people(rng, 2)
    obj = rng.choice(_OBJECTS)
    a = rng.randint(5, 30)
    b = rng.randint(1, a - 2)
    s.do(a, "-", b, f"{n} gives away {b} of {a} {obj}, so {_EQ} {obj} are left.")
    return f"{n} had {a} {obj} and gave {b} of them to {m}. How many {obj} does {n} have left?"


def _l1_groups(rng: random.Random, s: Steps) -> str:
    (n, _, _), obj, box = _people(rng, 1)[0], rng.choice(_OBJECTS), rng.choice(_CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    s.do(a, "*", b, f"{a} {box} with {b} {obj} each make {_EQ} {obj}.")
    return f"{n} has {a} {box} with {b} {obj} in each. How many {obj} does {n} have in total?"


def _l1_share(rng: random.Random, s: Steps) -> str:
    (n, _, _), obj, who = _people(rng, 1)[0], rng.choice(_OBJECTS), rng.choice(_PEOPLE)
    k, q = rng.randint(2, 6), rng.randint(2, 9)
    s.do(k * q, "/", k, f"{k * q} {obj} shared equally among {k} {who} gives {_EQ} {obj} each.")
    return f"{n} shares {k * q} {obj} equally among {k} {who}. How many {obj} does each of them get?"


def _l1_travel(rng: random.Random, s: Steps) -> str:
    v = rng.choice(_VEHICLES)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    s.do(a, "+", b, f"The {v} travels {a} km and then {b} km, so {_EQ} km in total.")
    return f"A {v} travels {a} km in the morning and {b} km in the afternoon. How many km does it travel in total?"


def _l1_ages(rng: random.Random, s: Steps) -> str:
    (n, _, _), (m, _, _) = _people(rng, 2)
    a, b = rng.randint(3, 40), rng.randint(2, 30)
    s.do(a, "+", b, f"{m} is {b} years older than {n}, who is {a}, so {m} is {_EQ} years old.")
    return f"{n} is {a} years old. {m} is {b} years older than {n}. How old is {m}?"


def _l1_reading(rng: random.Random, s: Steps) -> str:
    (n, _, _) = _people(rng, 1)[0]
    a, b = rng.randint(5, 30), rng.randint(2, 7)
    s.do(a, "*", b, f"{n} reads {a} pages a day for {b} days, so {_EQ} pages.")
    return f"{n} reads {a} pages every day. How many pages does {n} read in {b} days?"


# ----------------------------------------------------------------- level 2: two steps

def _l2_change(rng: random.Random, s: Steps) -> str:
    (n, _, _), (items, item) = _people(rng, 1)[0], rng.choice(_ITEMS)
    a, price = rng.randint(2, 6), rng.randint(2, 15)
    cost = a * price
    bill = rng.choice([b for b in (10, 20, 50, 100) if b > cost + 1] or [0])
    if bill == 0:
        raise Retry
    c = s.do(a, "*", price, f"{a} {items} at ${price} each cost {_EQ} dollars.")
    s.do(bill, "-", c, f"Paying with ${bill} leaves {_EQ} dollars in change.")
    return f"{n} buys {a} {items} for ${price} each and pays with a ${bill} bill. How many dollars of change does {n} get?"


def _l2_buy_and_share(rng: random.Random, s: Steps) -> str:
    (n, p, _), obj, who = _people(rng, 1)[0], rng.choice(_OBJECTS), rng.choice(_PEOPLE)
    k, q = rng.randint(2, 6), rng.randint(2, 10)
    total = k * q
    a = rng.randint(2, total - 2)
    b = total - a
    t = s.do(a, "+", b, f"{n} has {a} {obj} and buys {b} more, so {_EQ} {obj}.")
    s.do(t, "/", k, f"Sharing {t} {obj} equally among {k} {who} gives {_EQ} each.")
    return (f"{n} has {a} {obj} and buys {b} more. Then {p} shares all of them equally among {k} {who}. "
            f"How many {obj} does each of them get?")


def _l2_drive(rng: random.Random, s: Steps) -> str:
    v = rng.choice(_VEHICLES)
    speed, h, d = rng.randrange(30, 95, 5), rng.randint(2, 5), rng.randint(5, 60)
    c = s.do(speed, "*", h, f"At {speed} km per hour for {h} hours the {v} covers {_EQ} km.")
    s.do(c, "+", d, f"Adding the last {d} km gives {_EQ} km.")
    return f"A {v} drives at {speed} km per hour for {h} hours, then another {d} km. How many km does it go in total?"


def _l2_ages(rng: random.Random, s: Steps) -> str:
    (n, _, _), (m, _, _) = _people(rng, 2)
    a, k, y = rng.randint(2, 15), rng.randint(2, 4), rng.randint(2, 10)
    b = s.do(a, "*", k, f"{m} is {k} times as old as {n}, so {m} is {_EQ} years old.")
    s.do(b, "+", y, f"In {y} years {m} will be {_EQ} years old.")
    return f"{n} is {a} years old. {m} is {k} times as old as {n}. How old will {m} be in {y} years?"


def _l2_trip_left(rng: random.Random, s: Steps) -> str:
    (n, _, _) = _people(rng, 1)[0]
    speed, h = rng.randrange(40, 85, 5), rng.randint(2, 4)
    total = speed * h + rng.randint(10, 150)
    c = s.do(speed, "*", h, f"Driving {h} hours at {speed} km per hour covers {_EQ} km.")
    s.do(total, "-", c, f"Of the {total} km trip, {_EQ} km are left.")
    return f"A trip is {total} km long. {n} drives for {h} hours at {speed} km per hour. How many km are left?"


def _l2_savings(rng: random.Random, s: Steps) -> str:
    (n, p, _), thing = _people(rng, 1)[0], rng.choice(_THINGS)
    w, k = rng.randint(5, 25), rng.randint(3, 10)
    e = rng.randint(1, w * k - 2)
    t = s.do(w, "*", k, f"Saving ${w} a week for {k} weeks gives {_EQ} dollars.")
    s.do(t, "-", e, f"After spending ${e}, {_EQ} dollars are left.")
    return (f"{n} saves ${w} every week. After {k} weeks, {p} spends ${e} on a {thing}. "
            f"How many dollars does {n} have left?")


# ----------------------------------------------------------------- level 3: three or four steps

def _l3_packs(rng: random.Random, s: Steps) -> str:
    (n, p, _), obj, who = _people(rng, 1)[0], rng.choice(_OBJECTS), rng.choice(_PEOPLE)
    a, b, k = rng.randint(2, 6), rng.randint(4, 12), rng.randint(2, 6)
    c = (-a * b) % k or k
    if c == 1:  # no "1 loose pencils"
        c += k
    c += k * rng.randint(0, 2)
    packed = s.do(a, "*", b, f"{a} packs of {b} {obj} hold {_EQ} {obj}.")
    t = s.do(packed, "+", c, f"With {c} loose {obj} there are {_EQ} {obj}.")
    s.do(t, "/", k, f"Shared equally among {k} {who}, each gets {_EQ} {obj}.")
    return (f"{n} buys {a} packs of {b} {obj} and {c} loose {obj}. {p.capitalize()} shares them equally "
            f"among {k} {who}. How many {obj} does each of them get?")


def _l3_bakery(rng: random.Random, s: Steps) -> str:
    trays, per, q, price = rng.randint(2, 6), rng.randint(6, 12), rng.randint(3, 6), rng.randint(2, 9)
    boxes, sold = _split_with_remainder(rng, trays * per, q)
    t = s.do(trays, "*", per, f"{trays} trays of {per} muffins make {_EQ} muffins.")
    rest = s.do(t, "-", sold, f"After selling {sold} in the morning, {_EQ} muffins remain.")
    b = s.do(rest, "/", q, f"Boxes of {q} hold them in {_EQ} boxes.")
    s.do(b, "*", price, f"At ${price} per box the bakery makes {_EQ} dollars.")
    return (f"A bakery bakes {trays} trays of {per} muffins. It sells {sold} muffins in the morning and packs "
            f"the rest into boxes of {q}. Each box sells for ${price}. How many dollars does the bakery make "
            f"from the boxes?")


def _l3_wages(rng: random.Random, s: Steps) -> str:
    (n, p, _) = _people(rng, 1)[0]
    w, h, d, k = rng.randint(8, 20), rng.randint(2, 8), rng.randint(2, 6), rng.randint(2, 5)
    jar, spent = _split_with_remainder(rng, w * h * d, k)
    day = s.do(w, "*", h, f"{n} earns ${w} an hour for {h} hours, so {_EQ} dollars a day.")
    total = s.do(day, "*", d, f"Over {d} days that is {_EQ} dollars.")
    left = s.do(total, "-", spent, f"After spending ${spent}, {_EQ} dollars are left.")
    s.do(left, "/", k, f"Split into {k} jars, each jar gets {_EQ} dollars.")
    return (f"{n} earns ${w} per hour and works {h} hours a day for {d} days. {p.capitalize()} spends ${spent} "
            f"and splits the rest equally into {k} savings jars. How many dollars go into each jar?")


def _l3_fuel(rng: random.Random, s: Steps) -> str:
    v = rng.choice(_VEHICLES)
    s1, h1, h2, r = rng.randrange(30, 95, 5), rng.randint(2, 4), rng.randint(2, 4), rng.choice([5, 8, 10, 12, 15])
    options = [s2 for s2 in range(30, 95, 5) if s2 != s1 and (s1 * h1 + s2 * h2) % r == 0]
    if not options:
        raise Retry
    s2 = rng.choice(options)
    d1 = s.do(s1, "*", h1, f"At {s1} km per hour for {h1} hours the {v} covers {_EQ} km.")
    d2 = s.do(s2, "*", h2, f"At {s2} km per hour for {h2} hours it covers {_EQ} km.")
    dist = s.do(d1, "+", d2, f"In total it travels {_EQ} km.")
    s.do(dist, "/", r, f"Using 1 liter every {r} km, it needs {_EQ} liters.")
    return (f"A {v} travels at {s1} km per hour for {h1} hours and then at {s2} km per hour for {h2} hours. "
            f"It uses 1 liter of fuel for every {r} km. How many liters of fuel does it use?")


def _l3_ages(rng: random.Random, s: Steps) -> str:
    (n, _, _), (m, _, _), (o, _, _) = _people(rng, 3)
    a, k = rng.randint(3, 12), rng.randint(2, 4)
    d = rng.randint(2, a * k - 2)
    b = s.do(a, "*", k, f"{m} is {k} times as old as {n}, so {_EQ} years old.")
    c = s.do(b, "-", d, f"{o} is {d} years younger than {m}, so {_EQ} years old.")
    ab = s.do(a, "+", b, f"{n} and {m} together are {_EQ} years old.")
    s.do(ab, "+", c, f"Adding {o} gives {_EQ} years.")
    return (f"{n} is {a} years old. {m} is {k} times as old as {n}, and {o} is {d} years younger than {m}. "
            f"What is the sum of their three ages?")


def _l3_garden(rng: random.Random, s: Steps) -> str:
    (n, p, _), crop = _people(rng, 1)[0], rng.choice(_CROPS)
    crops = _CROP_PLURAL[crop]
    rows, per, yield_, q = rng.randint(2, 5), rng.randint(3, 8), rng.randint(3, 9), rng.randint(4, 10)
    bags, kept = _split_with_remainder(rng, rows * per * yield_, q)
    plants = s.do(rows, "*", per, f"{rows} rows of {per} plants make {_EQ} plants.")
    total = s.do(plants, "*", yield_, f"Each gives {yield_} {crops}, so {_EQ} {crops}.")
    rest = s.do(total, "-", kept, f"Keeping {kept} leaves {_EQ} {crops} to sell.")
    s.do(rest, "/", q, f"In bags of {q} that is {_EQ} bags.")
    return (f"{n} plants {rows} rows of {per} {crop} plants. Each plant gives {yield_} {crops}. "
            f"{p.capitalize()} keeps {kept} {crops} and sells the rest in bags of {q}. How many bags does {n} sell?")


def _l3_crayons(rng: random.Random, s: Steps) -> str:
    boxes, per, k = rng.randint(2, 8), rng.choice([8, 12, 16, 24]), rng.randint(3, 8)
    each, broken = _split_with_remainder(rng, boxes * per, k)
    t = s.do(boxes, "*", per, f"{boxes} boxes of {per} crayons hold {_EQ} crayons.")
    rest = s.do(t, "-", broken, f"Without the {broken} broken ones, {_EQ} crayons remain.")
    s.do(rest, "/", k, f"Shared among {k} students, each gets {_EQ} crayons.")
    return (f"A teacher has {boxes} boxes of {per} crayons. {broken} crayons are broken and thrown away. "
            f"The rest are shared equally among {k} students. How many crayons does each student get?")


TEMPLATES: dict[int, list[Callable[[random.Random, Steps], str]]] = {
    1: [_l1_buy_more, _l1_give_away, _l1_groups, _l1_share, _l1_travel, _l1_ages, _l1_reading],
    2: [_l2_change, _l2_buy_and_share, _l2_drive, _l2_ages, _l2_trip_left, _l2_savings],
    3: [_l3_packs, _l3_bakery, _l3_wages, _l3_fuel, _l3_ages, _l3_garden, _l3_crayons],
}
