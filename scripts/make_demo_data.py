"""Write sftcore/assets/demo.jsonl: a small Alpaca-format set, deterministic, made from rules.

Rows are short so a tiny model can memorise them on a CPU in seconds.
Usage: python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPPOSITES = [("hot", "cold"), ("up", "down"), ("early", "late"), ("full", "empty"), ("light", "dark"),
             ("fast", "slow"), ("open", "closed"), ("old", "new"), ("wet", "dry"), ("loud", "quiet"),
             ("high", "low"), ("hard", "soft"), ("rich", "poor"), ("near", "far"), ("thick", "thin")]
COLOURS = [("red", "rouge"), ("blue", "bleu"), ("green", "vert"), ("black", "noir"), ("white", "blanc"),
           ("yellow", "jaune"), ("grey", "gris"), ("pink", "rose"), ("brown", "marron"), ("orange", "orange")]
WORDS = ["planet", "garden", "silver", "window", "river", "candle", "forest", "pencil", "marble", "rocket",
         "basket", "dragon", "harbor", "lemon", "meadow"]
PLURALS = [("child", "children"), ("mouse", "mice"), ("box", "boxes"), ("city", "cities"), ("leaf", "leaves"),
           ("foot", "feet"), ("tooth", "teeth"), ("knife", "knives"), ("bus", "buses"), ("goose", "geese")]


def rows() -> list[dict[str, str]]:
    rng = random.Random(7)
    out = []
    for a, b in OPPOSITES:
        out.append({"instruction": f"Give the opposite of the word '{a}'.", "input": "", "output": f"The opposite of '{a}' is '{b}'."})
    for en, fr in COLOURS:
        out.append({"instruction": "Translate the colour into French.", "input": en, "output": fr})
    for word in WORDS:
        out.append({"instruction": "Write the word backwards.", "input": word, "output": word[::-1]})
        out.append({"instruction": f"How many letters are in the word '{word}'?", "input": "", "output": f"'{word}' has {len(word)} letters."})
    for one, many in PLURALS:
        out.append({"instruction": "Give the plural of this noun.", "input": one, "output": many})
    sums: set[tuple[int, int]] = set()
    while len(sums) < 40:  # no row twice: the demo shows a summary without duplicates
        x, y = rng.randint(2, 40), rng.randint(2, 40)
        if (x, y) not in sums:
            sums.add((x, y))
            out.append({"instruction": f"What is {x} plus {y}?", "input": "", "output": f"{x} plus {y} is {x + y}."})
    sorts: set[tuple[str, ...]] = set()
    while len(sorts) < 15:
        items = tuple(rng.sample(WORDS, 3))
        if items not in sorts:
            sorts.add(items)
            out.append({"instruction": "Sort these words alphabetically.", "input": ", ".join(items), "output": ", ".join(sorted(items))})
    return out


def main() -> None:
    path = Path(__file__).resolve().parents[1] / "sftcore" / "assets" / "demo.jsonl"
    data = rows()
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    print(f"wrote {len(data)} rows to {path}")


if __name__ == "__main__":
    main()
