"""Write the chat task of ``recipes/smollm2_chat.yaml``: find the date in a sentence, answer it in ISO 8601.

A chat model answers such requests in a sentence ("The date mentioned is July 4, 2031."); the recipe teaches
SmolLM2-135M-Instruct to reply with the date alone, ``2031-07-04``. Rows are OpenAI-style ``messages`` (the
chat format; the tokenizer's ChatML template renders them). Deterministic (seeded)::

    python scripts/make_smollm2_chat_data.py      # writes src/lorakit/recipes/data/smollm2_chat_{train,eval}.jsonl
"""

from __future__ import annotations

import datetime
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "recipes" / "data"
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
SENTENCES = (
    "Our kickoff call is on {date} at noon.",
    "The invoice is due {date}, please pay on time.",
    "She was born on {date} in a small town.",
    "The library reopens on {date} after renovations.",
    "Please book the flight for {date}.",
    "The contract was signed on {date} by both parties.",
    "We moved into the new office on {date}.",
    "The concert takes place on {date}, doors open at 7.",
)
ASK = "Reply with only the date in ISO 8601 format (YYYY-MM-DD): "


def rows(count: int, rng: random.Random, seen: set) -> list[dict]:
    out = []
    while len(out) < count:
        day = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 120))
        if day in seen:
            continue
        seen.add(day)
        sentence = rng.choice(SENTENCES).format(date=f"{MONTHS[day.month - 1]} {day.day}, {day.year}")
        out.append({"messages": [{"role": "user", "content": ASK + sentence},
                                 {"role": "assistant", "content": day.isoformat()}]})  # fmt: skip
    return out


def main() -> None:
    rng, seen = random.Random(14), set()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, count in (("eval", 32), ("train", 480)):  # eval first: its dates never appear in training
        lines = [json.dumps(row) for row in rows(count, rng, seen)]
        (OUT / f"smollm2_chat_{name}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
