"""Generate the quickstart's bundled prompts: short multi-step math word problems with verifiable integer answers.

    python scripts/make_math_prompts.py            # writes trl_ltc/resources/math_prompts_{train,test}.jsonl
    python scripts/make_math_prompts.py --check    # fails if the committed files differ from what it generates

Each line is `{"prompt": [{"role": "user", "content": "..."}], "answer": "42"}`. Problems come from 27 templates (two to
four arithmetic operations, two wordings each) filled with seeded random names, objects and numbers chosen so that every
answer is a positive integer. The templates are used in turn, so both splits cover all of them; the test split is
held out: no problem text appears in both. The output depends only on `--seed` and the sizes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "trl_ltc" / "resources"

NAMES = [
    "Maya", "Liam", "Sofia", "Noah", "Aisha", "Mateo", "Emma", "Kenji", "Zara", "Omar", "Lucy", "Ravi", "Chloe",
    "Diego", "Hana", "Felix", "Priya", "Jonas", "Amara", "Theo", "Nina", "Samuel", "Leila", "Oscar",
]  # fmt: skip
PRONOUNS = {
    "Maya": "she", "Liam": "he", "Sofia": "she", "Noah": "he", "Aisha": "she", "Mateo": "he", "Emma": "she",
    "Kenji": "he", "Zara": "she", "Omar": "he", "Lucy": "she", "Ravi": "he", "Chloe": "she", "Diego": "he",
    "Hana": "she", "Felix": "he", "Priya": "she", "Jonas": "he", "Amara": "she", "Theo": "he", "Nina": "she",
    "Samuel": "he", "Leila": "she", "Oscar": "he",
}  # fmt: skip
SUFFIXES = ["", "", " Explain your reasoning.", " Show your work.", " Think step by step.", " Answer with a number."]


def _people(r: random.Random, k: int) -> list[str]:
    return r.sample(NAMES, k)


def _pron(name: str) -> str:
    return PRONOUNS[name]


def _poss(name: str) -> str:
    return "her" if PRONOUNS[name] == "she" else "his"


def packs(r):
    a, b = _people(r, 2)
    item = r.choice(["stickers", "pencils", "cookies", "marbles", "trading cards", "balloons"])
    n, k = r.randint(3, 9), r.randint(4, 12)
    g = r.randint(2, n * k - 1)
    text = r.choice(
        [
            (
                f"{a} buys {n} packs of {item} with {k} {item} in each pack. {_pron(a).capitalize()} gives {g} of "
                f"them to {b}. How many {item} does {a} have left?"
            ),
            (
                f"There are {k} {item} in a pack. {a} bought {n} packs and then gave {g} {item} to {b}. How many "
                f"{item} does {a} still have?"
            ),
        ]
    )
    return text, n * k - g


def change(r):
    a = _people(r, 1)[0]
    n, p, q = r.randint(2, 6), r.randint(2, 9), r.randint(1, 5)
    cost = n * p + q
    bill = next(b for b in (10, 20, 50, 100) if b > cost)
    text = r.choice(
        [
            (
                f"{a} buys {n} notebooks at ${p} each and a pen for ${q}. {_pron(a).capitalize()} pays with a ${bill} "
                f"bill. How much change does {_pron(a)} get, in dollars?"
            ),
            (
                f"Notebooks cost ${p} each and pens cost ${q}. {a} buys {n} notebooks and one pen and hands the "
                f"cashier ${bill}. How many dollars of change should {a} receive?"
            ),
        ]
    )
    return text, bill - cost


def two_legs(r):
    v1, h1, v2, h2 = r.choice([40, 50, 60, 70, 80]), r.randint(1, 4), r.choice([30, 45, 55, 65, 90]), r.randint(1, 3)
    vehicle = r.choice(["A train", "A bus", "A truck", "A car"])
    text = r.choice(
        [
            (
                f"{vehicle} travels at {v1} km per hour for {h1} hours, then at {v2} km per hour for {h2} hours. How "
                "many kilometers does it travel in total?"
            ),
            (
                f"For the first {h1} hours of a trip, {vehicle.lower()} drives at {v1} km/h. For the next {h2} hours "
                f"it drives at {v2} km/h. What is the total distance in kilometers?"
            ),
        ]
    )
    return text, v1 * h1 + v2 * h2


def savings(r):
    a = _people(r, 1)[0]
    s, w = r.randint(5, 25), r.randint(4, 12)
    thing = r.choice(["bike helmet", "video game", "pair of shoes", "board game", "backpack"])
    x = r.randint(10, s * w - 1)
    text = r.choice(
        [
            (
                f"{a} saves ${s} every week. After {w} weeks, {_pron(a)} spends ${x} on a {thing}. How much money "
                f"does {_pron(a)} have left?"
            ),
            (
                f"Every week {a} puts ${s} into a piggy bank. After {w} weeks {_pron(a)} takes out ${x} to buy a "
                f"{thing}. How many dollars are left in the piggy bank?"
            ),
        ]
    )
    return text, s * w - x


def sharing(r):
    n, k = r.randint(3, 8), r.randint(4, 10)
    e = r.randint(1, k - 1)
    item = r.choice(["cookies", "strawberries", "candies", "grapes"])
    text = r.choice(
        [
            (
                f"{n} friends share {n * k} {item} equally. Each friend eats {e} of their {item} right away. How many "
                f"{item} does each friend have left?"
            ),
            (
                f"A bowl of {n * k} {item} is split evenly among {n} children. If every child eats {e}, how many "
                f"{item} does each child still have?"
            ),
        ]
    )
    return text, k - e


def garden(r):
    rows, cols, t = r.randint(3, 9), r.randint(4, 12), r.randint(2, 8)
    plant = r.choice(["tomato plants", "pepper plants", "bean plants"])
    text = r.choice(
        [
            (
                f"A garden has {rows} rows with {cols} {plant} in each row. Each plant produces {t} vegetables. How "
                "many vegetables does the garden produce?"
            ),
            (
                f"In a garden there are {rows} rows of {plant}, {cols} plants per row. If every plant gives {t} "
                "vegetables, how many vegetables are there in total?"
            ),
        ]
    )
    return text, rows * cols * t


def ages(r):
    a, b = _people(r, 2)
    age_b, k, y = r.randint(5, 30), r.randint(2, 15), r.randint(2, 10)
    text = r.choice(
        [
            (
                f"{a} is {k} years older than {b}. {b} is {age_b} years old. What will the sum of their ages be in "
                f"{y} years?"
            ),
            (
                f"{b} is {age_b} and {a} is {k} years older. In {y} years, how old will they be when you add their "
                "ages together?"
            ),
        ]
    )
    return text, 2 * age_b + k + 2 * y


def reading(r):
    a = _people(r, 1)[0]
    d, n = r.randint(8, 30), r.randint(3, 9)
    pages = d * n + r.randint(10, 150)
    text = r.choice(
        [
            f"A book has {pages} pages. {a} reads {d} pages a day for {n} days. How many pages are left to read?",
            (
                f"{a} is reading a {pages}-page novel. {_pron(a).capitalize()} reads {d} pages every day. After {n} "
                "days, how many pages remain?"
            ),
        ]
    )
    return text, pages - d * n


def bakery(r):
    k, boxes, b = r.choice([4, 6, 8, 12]), r.randint(3, 12), r.randint(2, 5)
    m = (boxes * k) // b + r.randint(1, 6)  # muffins per batch, so that some are sold and the rest fill `boxes` boxes
    sold = b * m - boxes * k
    text = r.choice(
        [
            (
                f"A bakery makes {b} batches of {m} muffins. It sells {sold} muffins at the counter and packs the "
                f"rest into boxes of {k}. How many boxes does it fill?"
            ),
            (
                f"There are {m} muffins in each of {b} trays. After {sold} muffins are sold, the remaining muffins "
                f"are packed {k} to a box. How many boxes are needed?"
            ),
        ]
    )
    return text, boxes


def school(r):
    c, s = r.randint(3, 8), r.randint(18, 32)
    a = r.randint(2, 15)
    text = r.choice(
        [
            (
                f"A school has {c} classes with {s} students in each class. On Monday {a} students are absent. How "
                "many students are at school on Monday?"
            ),
            (
                f"There are {s} students in each of the {c} classes of a school. If {a} students stay home sick, how "
                "many students are present?"
            ),
        ]
    )
    return text, c * s - a


def marbles(r):
    a, b = _people(r, 2)
    x = 2 * r.randint(10, 40)
    lost = r.randint(1, x // 2 - 1)
    text = r.choice(
        [
            (
                f"{a} had {x} marbles. {_pron(a).capitalize()} gave half of them to {b} and then lost {lost} more. "
                f"How many marbles does {a} have now?"
            ),
            f"{a} starts with {x} marbles, gives half to {b}, and later loses {lost}. How many marbles are left?",
        ]
    )
    return text, x // 2 - lost


def fence(r):
    length, width, c = r.randint(5, 30), r.randint(3, 20), r.randint(2, 9)
    text = r.choice(
        [
            (
                f"A rectangular field is {length} meters long and {width} meters wide. Fencing costs ${c} per meter. "
                "How much does it cost to fence the whole field?"
            ),
            (
                f"How many dollars does it cost to put a fence around a {length} m by {width} m rectangular garden if "
                f"the fence costs ${c} per meter?"
            ),
        ]
    )
    return text, 2 * (length + width) * c


def wages(r):
    a = _people(r, 1)[0]
    h, d, w = r.randint(2, 8), r.randint(2, 6), r.randint(8, 20)
    s = r.randint(5, h * d * w - 1)
    text = r.choice(
        [
            (
                f"{a} works {h} hours a day for {d} days and earns ${w} per hour. {_pron(a).capitalize()} then spends "
                f"${s} on groceries. How much money does {_pron(a)} have left?"
            ),
            (
                f"{a} earns ${w} an hour. This week {_pron(a)} worked {h} hours on each of {d} days and spent ${s}. "
                "How many dollars are left from this week's pay?"
            ),
        ]
    )
    return text, h * d * w - s


def wheels(r):
    c, b, t = r.randint(3, 20), r.randint(2, 15), r.randint(1, 4)
    text = r.choice(
        [
            f"A parking lot has {c} cars, {b} bicycles and {t} tricycles. How many wheels are there in total?",
            (
                f"In a garage there are {c} cars, {b} bikes and {t} tricycles. Counting every wheel, how many wheels "
                "are there?"
            ),
        ]
    )
    return text, 4 * c + 2 * b + 3 * t


def fuel(r):
    per, d, p = r.randint(5, 9), 100 * r.randint(2, 6), r.randint(1, 2)
    text = r.choice(
        [
            (
                f"A car uses {per} liters of fuel per 100 km. Fuel costs ${p} per liter. How much does the fuel for a "
                f"{d} km trip cost?"
            ),
            (
                f"On a {d} km drive, a car burns {per} liters every 100 km. At ${p} a liter, what is the fuel bill in "
                "dollars?"
            ),
        ]
    )
    return text, per * d // 100 * p


def discount(r):
    a = _people(r, 1)[0]
    price, pct, n = 20 * r.randint(1, 10), r.choice([10, 20, 25, 50]), r.randint(2, 4)
    item = r.choice(["jacket", "lamp", "chair", "pair of headphones"])
    text = r.choice(
        [
            (
                f"A {item} costs ${price}. It is on sale for {pct}% off. {a} buys {n} of them. How much does "
                f"{_pron(a)} pay?"
            ),
            (
                f"{a} wants {n} of a {item} that normally sells for ${price}. Today everything is {pct}% off. What is "
                "the total cost in dollars?"
            ),
        ]
    )
    return text, price * (100 - pct) // 100 * n


def episodes(r):
    n, m, b = r.randint(2, 6), r.choice([20, 25, 30, 40, 45]), r.randint(5, 15)
    text = r.choice(
        [
            (
                f"{n} episodes of a show are {m} minutes each, with a {b}-minute break between episodes. How many "
                "minutes does it take to watch them all?"
            ),
            (
                f"You watch {n} episodes back to back, each {m} minutes long, and take a {b} minute break between any "
                "two. What is the total time in minutes?"
            ),
        ]
    )
    return text, n * m + (n - 1) * b


def eggs(r):
    hens, per = r.randint(2, 12), r.randint(1, 2)
    days = 12 if (hens * per) % 2 else 6
    text = r.choice(
        [
            (
                f"A farmer has {hens} hens. Each hen lays {per} eggs a day. The eggs are sold by the dozen. How many "
                f"dozens does the farmer have after {days} days?"
            ),
            (
                f"Each of {hens} hens lays {per} eggs per day. After {days} days, how many full cartons of 12 eggs "
                "can be filled?"
            ),
        ]
    )
    return text, hens * per * days // 12


def tank(r):
    leak, net, minutes = r.randint(1, 4), r.randint(2, 8), r.randint(5, 20)
    fill = leak + net
    text = r.choice(
        [
            (
                f"An empty tank holds {net * minutes} liters. Water flows in at {fill} liters per minute but leaks "
                f"out at {leak} liters per minute. How many minutes does it take to fill the tank?"
            ),
            (
                f"A pipe pours {fill} liters a minute into a tank that leaks {leak} liters a minute. How long, in "
                f"minutes, until the tank's {net * minutes} liters are full?"
            ),
        ]
    )
    return text, minutes


def stamps(r):
    a, b, c = _people(r, 3)
    x, k = r.randint(5, 30), r.randint(2, 4)
    m = r.randint(1, k * x - 1)
    text = r.choice(
        [
            (
                f"{a} has {x} stamps. {b} has {k} times as many stamps as {a}. {c} has {m} fewer stamps than {b}. How "
                "many stamps do they have together?"
            ),
            (
                f"{b} owns {k} times as many stamps as {a}, who owns {x}. {c} owns {m} fewer than {b}. What is the "
                "total number of stamps?"
            ),
        ]
    )
    return text, x + k * x + (k * x - m)


def pizza(r):
    n, s, p = r.randint(2, 6), r.choice([6, 8, 10, 12]), r.randint(2, 8)
    e = r.randint(1, max(1, n * s // p - 1))
    eaten = f"{e} slice" if e == 1 else f"{e} slices"
    text = r.choice(
        [
            f"{n} pizzas are each cut into {s} slices. {p} people each eat {eaten}. How many slices are left?",
            (
                f"At a party there are {n} pizzas with {s} slices apiece. If {p} guests eat {eaten} each, how many "
                "slices remain?"
            ),
        ]
    )
    return text, n * s - p * e


def bus(r):
    start, off1 = r.randint(20, 40), r.randint(2, 10)
    on1, off2 = r.randint(1, 12), r.randint(2, 10)
    text = r.choice(
        [
            (
                f"A bus leaves the station with {start} passengers. At the first stop {off1} people get off and {on1} "
                f"get on. At the second stop {off2} people get off. How many passengers are on the bus now?"
            ),
            (
                f"There are {start} people on a bus. {off1} get off and {on1} get on at one stop, and {off2} more get "
                "off at the next. How many people are left on the bus?"
            ),
        ]
    )
    return text, start - off1 + on1 - off2


def average(r):
    a = _people(r, 1)[0]
    target = r.randint(70, 90)
    scores = [r.randint(60, 98) for _ in range(3)]
    need = 4 * target - sum(scores)
    while not 1 <= need <= 100:
        scores = [r.randint(60, 98) for _ in range(3)]
        need = 4 * target - sum(scores)
    text = r.choice(
        [
            (
                f"{a} scored {scores[0]}, {scores[1]} and {scores[2]} on three tests. What score does {_pron(a)} need "
                f"on the fourth test to average exactly {target}?"
            ),
            (
                f"After three quizzes {a} has scores of {scores[0]}, {scores[1]} and {scores[2]}. To have an average "
                f"of {target} over four quizzes, what must {_pron(a)} score on the last one?"
            ),
        ]
    )
    return text, need


def recipe(r):
    cups, serv, mult = r.randint(2, 5), r.choice([2, 3, 4, 6]), r.randint(2, 5)
    text = r.choice(
        [
            (
                f"A recipe uses {cups} cups of flour to make {serv} servings. How many cups of flour are needed for "
                f"{serv * mult} servings?"
            ),
            (
                f"To serve {serv} people a cook needs {cups} cups of flour. How many cups does the cook need for "
                f"{serv * mult} people?"
            ),
        ]
    )
    return text, cups * mult


def library(r):
    books, buys, months, removed = r.randint(200, 900), r.randint(10, 40), r.randint(2, 6), r.randint(5, 60)
    text = r.choice(
        [
            (
                f"A library has {books} books. It buys {buys} new books every month for {months} months and removes "
                f"{removed} damaged books. How many books does it have now?"
            ),
            (
                f"A school library starts the year with {books} books, adds {buys} books a month for {months} months, "
                f"and throws away {removed} worn-out ones. How many books are on the shelves?"
            ),
        ]
    )
    return text, books + buys * months - removed


def laps(r):
    a = _people(r, 1)[0]
    track, l1, l2 = r.choice([200, 250, 400]), r.randint(2, 8), r.randint(2, 8)
    text = r.choice(
        [
            (
                f"A running track is {track} meters long. {a} runs {l1} laps on Monday and {l2} laps on Tuesday. How "
                f"many meters does {_pron(a)} run in total?"
            ),
            (
                f"{a} jogs {l1} laps of a {track}-meter track one day and {l2} laps the next. What distance in meters "
                "is that altogether?"
            ),
        ]
    )
    return text, track * (l1 + l2)


def coins(r):
    a = _people(r, 1)[0]
    q, d, n = r.randint(1, 12), r.randint(1, 15), r.randint(1, 10)
    text = r.choice(
        [
            f"{a} has {q} quarters, {d} dimes and {n} nickels. How many cents does {_pron(a)} have?",
            (
                f"In {_poss(a)} pocket {a} finds {q} quarters, {d} dimes and {n} nickels. What is the total value in "
                "cents?"
            ),
        ]
    )
    return text, 25 * q + 10 * d + 5 * n


TEMPLATES = [
    packs, change, two_legs, savings, sharing, garden, ages, reading, bakery, school, marbles, fence, wages, wheels,
    fuel, discount, episodes, eggs, tank, stamps, pizza, bus, average, recipe, library, laps, coins,
]  # fmt: skip


def generate(n: int, r: random.Random, exclude: set[str]) -> list[dict]:
    """`n` new problems, cycling through the templates, skipping any text in `exclude` (which is updated)."""
    rows = []
    while len(rows) < n:
        text, answer = TEMPLATES[len(rows) % len(TEMPLATES)](r)
        if not (isinstance(answer, int) and answer > 0):
            raise AssertionError(f"non-positive or non-integer answer {answer!r} for: {text}")
        text += r.choice(SUFFIXES)
        if text in exclude:
            continue
        exclude.add(text)
        rows.append({"prompt": [{"role": "user", "content": text}], "answer": str(answer)})
    return rows


def build(seed: int, n_train: int, n_test: int) -> dict[str, str]:
    """The file contents of both splits, keyed by split name."""
    r, seen = random.Random(seed), set()
    splits = {"train": generate(n_train, r, seen), "test": generate(n_test, r, seen)}
    return {name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) for name, rows in splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    # 15 and 4 problems per template.
    parser.add_argument("--train", type=int, default=405, help="problems in the train split")
    parser.add_argument("--test", type=int, default=108, help="problems in the held-out test split")
    parser.add_argument("--out_dir", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true", help="compare with the files in --out_dir instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for split, content in build(args.seed, args.train, args.test).items():
        path = args.out_dir / f"math_prompts_{split}.jsonl"
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != content:
                stale.append(str(path))
        else:
            path.write_text(content, encoding="utf-8")
            print(f"wrote {content.count(chr(10))} problems to {path}")
    if stale:
        print(f"out of date (run scripts/make_math_prompts.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
