"""Embedded demo logs: a deterministic, seeded generator of rated nutrition-assistant conversations.

The demo (and many tests) need logs that look like production: a user question, the retrieved context the
assistant saw, the answer, a 1-5 rating, the prompt variant, the model, latency and token counts. They also need
the dirt production has, so every filter of `flywheel mine` has something to do:

- planted PII (emails, phone numbers, card numbers with a valid Luhn digit, IPv4/IPv6 addresses, IBANs with a
  valid mod-97 checksum) inside user messages; `write_demo_logs` returns the exact planted strings so a test can
  assert none of them reaches an output;
- exact duplicates (same text, new conversation id, whitespace/case changed) and near-duplicates (one word of the
  answer swapped), each planted with a different rating so "keep the best-rated member" is observable;
- malformed lines: truncated JSON, invalid UTF-8, rating "five", rating 11, a missing `messages`, a non-object;
- regenerated answers to the same prompt with a very different rating (rating-gap preference pairs).

Prompt variants `v1`/`v2` are assigned ~50/50 *by user* (a hash of the user id), as a real A/B test would, and
`v2` carries a planted rating effect (`V2_RATING_EFFECT`, on the latent 1-5 scale) so `flywheel ab` has a true
difference to find. Same `seed` and `n` => byte-identical file.
"""

from __future__ import annotations

import hashlib
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

V2_RATING_EFFECT = 0.6  # latent-scale shift for v2; after rounding/clamping the mean gap is ~0.4-0.5 stars
MODELS = ("smollm2-135m-instruct", "smollm2-135m-instruct+lora")
START = datetime(2026, 10, 1, 8, 0, 0, tzinfo=timezone.utc)

# name, protein g/100 g, a notable nutrient, a preparation hint
FOODS = [
    ("lentils", 9, "iron and folate", "simmer red lentils for 15 minutes, green ones for about 25"),
    ("chickpeas", 9, "fiber and manganese", "soak dried chickpeas overnight and cook them for an hour"),
    ("tofu", 8, "calcium when set with calcium sulfate", "press firm tofu for 20 minutes before frying"),
    ("tempeh", 19, "protein and probiotics from fermentation", "steam tempeh briefly to soften its bitterness"),
    ("quinoa", 4, "magnesium and all nine essential amino acids", "rinse quinoa to remove its bitter saponins"),
    ("rolled oats", 13, "beta-glucan fiber", "soak oats overnight in plant milk for a quick breakfast"),
    ("spinach", 3, "vitamin K and non-heme iron", "pair spinach with lemon juice to help iron absorption"),
    ("almonds", 21, "vitamin E", "toast almonds dry in a pan for three minutes"),
    ("chia seeds", 17, "omega-3 ALA", "let chia seeds gel in liquid for ten minutes"),
    ("hemp seeds", 32, "omega-3 and magnesium", "sprinkle hemp hearts on salads without cooking them"),
    ("black beans", 9, "fiber and potassium", "add a bay leaf when cooking black beans"),
    ("edamame", 11, "folate and vitamin K", "boil frozen edamame for five minutes"),
    ("peanut butter", 25, "niacin and healthy fats", "choose a brand with only peanuts and salt"),
    ("seitan", 25, "protein from wheat gluten", "simmer seitan gently so it does not turn spongy"),
    ("broccoli", 3, "vitamin C and sulforaphane", "steam broccoli for four minutes to keep it crisp"),
    ("kale", 4, "calcium and vitamin A", "massage raw kale with a little oil and salt"),
    ("sweet potatoes", 2, "beta-carotene", "roast sweet potatoes at 200 C for about 40 minutes"),
    ("brown rice", 3, "manganese and selenium", "cook brown rice with a 1 to 2 ratio of rice to water"),
    ("walnuts", 15, "omega-3 ALA", "store walnuts in the fridge so they do not go rancid"),
    ("fortified soy milk", 3, "calcium, vitamin D and B12", "shake fortified soy milk because the calcium settles"),
    ("nutritional yeast", 50, "B vitamins, often fortified with B12", "use nutritional yeast as a cheesy topping"),
    ("pumpkin seeds", 30, "zinc and iron", "roast pumpkin seeds with a pinch of salt"),
    ("flaxseed", 18, "omega-3 ALA and lignans", "grind flaxseed so the body can absorb it"),
    ("green peas", 5, "protein and vitamin C", "add frozen peas at the end of cooking"),
]

TOPICS = {
    "protein": "Adults need roughly 0.8 g of protein per kg of body weight a day, more when training hard.",
    "iron": "Plant iron is non-heme iron; vitamin C in the same meal can roughly double its absorption.",
    "b12": "Vitamin B12 is not reliably found in plant foods, so vegans need fortified foods or a supplement.",
    "calcium": "Adults need about 1000 mg of calcium a day; fortified plant milks and calcium-set tofu help most.",
    "omega-3": "ALA from seeds converts poorly to EPA and DHA, so some people add an algae oil supplement.",
    "fiber": "Most adults eat too little fiber; the common target is 25 to 38 g a day.",
    "budget": "Dried legumes and whole grains bought in bulk are among the cheapest sources of protein.",
    "meal prep": "Cooking a big batch of grains and legumes on Sunday makes weekday meals much faster.",
}

QUESTIONS = [
    "How much protein is in {food}?",
    "Is {food} a good source of {topic}?",
    "What's the best way to prepare {food}?",
    "Can I rely on {food} for {topic} on a vegan diet?",
    "How do I add more {food} to my meals?",
    "Are {food} healthy to eat every day?",
    "What does {food} give me nutritionally?",
    "I keep hearing about {food}. Why is it recommended for {topic}?",
]
SITUATIONS = [
    "", "", "", "I'm training for a half marathon.", "My doctor said my iron is a bit low.",
    "I just went vegan last month.", "I'm cooking for two kids.", "I'm on a tight student budget.",
    "I'm trying to lose a little weight.", "I lift weights four times a week.", "I'm pregnant.",
    "I don't like the taste of most beans.", "I only have twenty minutes to cook at night.",
]
OPENERS_V1 = ["Sure.", "Good question.", "Here is some information.", "Okay.", "Yes."]
OPENERS_V2 = ["Based on the notes I have:", "Short answer first:", "Here is what the sources say:",
              "Great question, let's be specific:"]
TIPS = [
    "Pair it with a source of vitamin C such as peppers or citrus.",
    "Combining legumes and grains over the day covers all essential amino acids.",
    "Batch cooking on the weekend saves a lot of time.",
    "Frozen vegetables are just as nutritious as fresh ones and cheaper.",
    "A registered dietitian can tailor this to your needs.",
    "Check the label for added sugar and salt.",
    "Spices like cumin and smoked paprika make simple dishes taste great.",
    "Drink enough water when you increase your fiber intake.",
    "A simple bowl of grains, legumes, greens and a sauce is a complete meal.",
    "Track your intake for a week in an app if you want to see real numbers.",
]
VAGUE = [
    "It depends on many factors.", "Everyone is different, so results vary.",
    "It can be part of a balanced diet.", "Moderation is usually a good idea.",
]
CLOSERS = ["Enjoy your meals!", "Hope this helps.", "Let me know if you want recipes.", "", ""]


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    digits = [int(c) for c in body]
    # Luhn: double every second digit from the right of the final number (the check digit is rightmost).
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return body + str((10 - total % 10) % 10)


def _iban(country: str, bban: str) -> str:
    rearranged = bban + country + "00"
    num = int("".join(str(int(c, 36)) for c in rearranged))
    check = 98 - num % 97
    raw = f"{country}{check:02d}{bban}"
    return " ".join(raw[i:i + 4] for i in range(0, len(raw), 4))


def _pii(rng: random.Random, i: int) -> tuple[str, str]:
    """(kind, value) of one planted PII string; the sentence around it comes from the caller."""
    kind = ("email", "phone", "card", "ip", "iban", "email", "phone", "ipv6")[i % 8]
    first = rng.choice(["jane", "omar", "li", "maria", "sam", "priya", "tom", "ana"])
    if kind == "email":
        return kind, f"{first}.{rng.choice(['doe', 'khan', 'wei', 'silva'])}{rng.randrange(10, 99)}@" \
                     f"{rng.choice(['example.com', 'mail.example.org', 'inbox.test'])}"
    if kind == "phone":
        return kind, rng.choice([f"+1 415 555 {rng.randrange(1000, 9999)}",
                                 f"(212) 555-{rng.randrange(1000, 9999)}",
                                 f"+44 20 7946 {rng.randrange(1000, 9999)}",
                                 f"+49 30 {rng.randrange(100000, 999999)}"])
    if kind == "card":
        num = _luhn_complete(rng.choice(["4", "51", "37"]), 16 if rng.random() < 0.8 else 15, rng)
        return kind, " ".join(num[j:j + 4] for j in range(0, len(num), 4))
    if kind == "ip":
        return kind, f"{rng.randrange(11, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    if kind == "ipv6":
        return "ip", "2001:db8:" + ":".join(f"{rng.randrange(65536):x}" for _ in range(3)) + "::" + \
               f"{rng.randrange(1, 65536):x}"
    country, bban = rng.choice([("DE", "37040044" + f"{rng.randrange(10**10):010d}"),
                                ("GB", "NWBK601613" + f"{rng.randrange(10**8):08d}"),
                                ("FR", f"{rng.randrange(10**10):010d}" + f"{rng.randrange(10**13):013d}")])
    return "iban", _iban(country, bban)


PII_SENTENCES = {
    "email": "You can email me the plan at {v}.",
    "phone": "Text me at {v} if that's easier.",
    "card": "I paid for the premium plan with card {v}, is that included?",
    "ip": "The app keeps logging me out from {v}, by the way.",
    "iban": "My dietitian's invoice says to pay to {v}, can you check it?",
}


def _conversation(rng: random.Random, k: int, user_id: str, variant: str) -> tuple[dict, float]:
    food, protein, nutrient, prep = rng.choice(FOODS)
    topic = rng.choice(list(TOPICS))
    question = rng.choice(QUESTIONS).format(food=food, topic=topic)
    situation = rng.choice(SITUATIONS)
    user = f"{situation} {question}".strip()
    context = (f"{food.capitalize()} provides about {protein} g of protein per 100 g and is notable for "
               f"{nutrient}. Preparation: {prep}. {TOPICS[topic]}")
    grounded = rng.random() < (0.75 if variant == "v2" else 0.45)
    parts = [rng.choice(OPENERS_V2 if variant == "v2" else OPENERS_V1)]
    if grounded:
        parts.append(f"{food.capitalize()} has about {protein} g of protein per 100 g and gives you {nutrient}.")
        parts.append(f"To prepare it, {prep}.")
        parts.append(TOPICS[topic])
    else:
        parts.append(f"{food.capitalize()} is a popular choice.")
        parts.extend(rng.sample(VAGUE, 2))
    parts.extend(rng.sample(TIPS, rng.randint(1, 3)))
    parts.append(rng.choice(CLOSERS))
    answer = " ".join(p for p in parts if p)
    # Latent quality: grounded answers are better, v2 carries the planted effect, users are noisy.
    latent = 3.1 + (0.7 if grounded else -0.3) + (V2_RATING_EFFECT if variant == "v2" else 0.0) + rng.gauss(0, 0.9)
    rating = int(min(5, max(1, round(latent))))
    words = len(user.split()) + len(answer.split())
    rec = {
        "conversation_id": f"demo-{k:05d}",
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        "rating": rating,
        "retrieved_context": context,
        "prompt_variant": variant,
        "model": MODELS[0] if rng.random() < 0.7 else MODELS[1],
        "user_id": user_id,
        "timestamp": (START + timedelta(minutes=7 * k + rng.randrange(7))).isoformat().replace("+00:00", "Z"),
        "latency_ms": int(rng.gauss(900 if variant == "v1" else 1050, 150) + 4 * len(answer.split())),
        "tokens": int(words * 1.3),
    }
    return rec, latent


def variant_for_user(user_id: str) -> str:
    """~50/50 by user, stable: the same user always sees the same variant (no contamination across arms)."""
    return "v2" if int(hashlib.sha256(user_id.encode()).hexdigest(), 16) % 2 else "v1"


def generate_demo_records(n: int = 300, seed: int = 0, dirty: bool = True) -> tuple[list[Any], dict]:
    """The records (dicts, or raw `bytes` for malformed lines) in file order, and a summary of what was planted.

    `n` is the number of base conversations; with `dirty` ~5% exact duplicates, ~5% near-duplicates and 7
    malformed lines are added, and ~12% of base conversations carry PII.
    """
    rng = random.Random(seed)
    users = [f"u{j:03d}" for j in range(max(4, n // 5))]
    rows: list[Any] = []
    planted: list[dict] = []
    dupes = near = 0
    for k in range(n):
        user_id = rng.choice(users)
        rec, _ = _conversation(rng, k, user_id, variant_for_user(user_id))
        if dirty and rng.random() < 0.12:
            kind, value = _pii(rng, len(planted))
            rec["messages"][0]["content"] += " " + PII_SENTENCES[kind].format(v=value)
            planted.append({"kind": kind, "value": value, "conversation_id": rec["conversation_id"]})
        rows.append(rec)
        if dirty and k > 10 and rng.random() < 0.05:  # a user re-asked: same text, new id, another rating
            # Duplicate a well-rated conversation, so both copies survive the rating filter and dedupe
            # (not the threshold) has to choose; the copy's rating flips 4 <-> 5, so sometimes it wins.
            good = [r for r in rows[:-1] if r["rating"] >= 4 and not r["conversation_id"].endswith(("-dup", "-near"))]
            if good:
                src = json.loads(json.dumps(rng.choice(good)))
                src["conversation_id"] = f"demo-{k:05d}-dup"
                src["messages"][0]["content"] = "  " + src["messages"][0]["content"].upper() + " "
                src["rating"] = 9 - src["rating"]
                rows.append(src)
                dupes += 1
        if dirty and k > 10 and rng.random() < 0.05:  # same answer with one word swapped
            cands = [r for r in rows[:-1] if r["rating"] >= 4 and not r["conversation_id"].endswith(("-dup", "-near"))]
            src = json.loads(json.dumps(rng.choice(cands or rows[:-1])))
            words = src["messages"][1]["content"].split(" ")
            j = rng.randrange(1, len(words))
            words[j] = rng.choice(["really", "quite", "very", "also"])
            src["messages"][1]["content"] = " ".join(words)
            src["conversation_id"] = f"demo-{k:05d}-near"
            src["rating"] = 9 - src["rating"] if src["rating"] >= 4 else src["rating"]
            rows.append(src)
            near += 1
    # Regenerations: the same user prompt answered again (retry button) and rated again, so answers to one
    # prompt differ in rating and `flywheel mine` can mine rating-gap preference pairs. A separate RNG stream
    # keeps the base conversations identical to what they were before this was added.
    regen = 0
    if dirty:
        rng2 = random.Random(seed + 7919)
        snapshot = list(rows)
        for k2 in sorted(rng2.sample(range(len(snapshot)), max(1, len(snapshot) // 15))):
            src = snapshot[k2]
            if src["conversation_id"].endswith(("-dup", "-near")):
                continue
            other = "v1" if src["prompt_variant"] == "v2" else "v2"
            again, _ = _conversation(rng2, k2, src["user_id"], other)
            again["messages"][0] = dict(src["messages"][0])
            again["retrieved_context"] = src["retrieved_context"]
            again["conversation_id"] = src["conversation_id"] + "-regen"
            again["prompt_variant"] = src["prompt_variant"]  # same user => same arm
            again["rating"] = 1 if src["rating"] >= 4 else 5
            rows.insert(next(j for j, r in enumerate(rows) if r is src) + 1, again)
            regen += 1
    malformed: list[Any] = []
    if dirty:
        good = json.dumps(rows[0], ensure_ascii=False)
        bad_rating = dict(rows[1], conversation_id="demo-bad-rating-text", rating="five")
        out_of_range = dict(rows[2], conversation_id="demo-bad-rating-11", rating=11)
        no_messages = {k: v for k, v in rows[3].items() if k != "messages"}
        no_messages["conversation_id"] = "demo-no-messages"
        malformed = [
            good[: len(good) // 2].encode(),                                  # truncated JSON
            b'{"conversation_id": "demo-bad-utf8", "messages": "caf\xe9"}',   # invalid UTF-8 (latin-1 byte)
            bad_rating, out_of_range, no_messages,
            b"[1, 2, 3]",                                                     # valid JSON, not an object
            dict(rows[4], conversation_id="demo-bad-role",
                 messages=[{"role": "robot", "content": "hi"}]),              # unknown role
        ]
        # Spread them through the file, deterministically.
        for m_i, m in enumerate(malformed):
            rows.insert(min(len(rows), 17 + m_i * (len(rows) // len(malformed))), m)
    summary = {"n_lines": len(rows), "base": n, "duplicates": dupes, "near_duplicates": near, "regenerated": regen,
               "malformed": len(malformed), "pii": planted, "v2_rating_effect": V2_RATING_EFFECT}
    return rows, summary


def write_demo_logs(path: str | Path, n: int = 300, seed: int = 0, dirty: bool = True) -> dict:
    """Write the demo chat-log JSONL to `path` (atomically); return the summary (planted PII strings, counts).

    Lines are JSON objects in the canonical chat-log shape (`conversation_id`, `messages`, `rating`,
    `retrieved_context`, `prompt_variant`, `model`, `user_id`, `timestamp`, `latency_ms`, `tokens`), except the
    planted malformed lines. `dirty=False` gives a clean file (no PII, duplicates or malformed lines).
    """
    import os
    import tempfile

    rows, summary = generate_demo_records(n=n, seed=seed, dirty=dirty)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n"
                    for r in rows)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:  # bytes, not text: the invalid-UTF-8 line must survive as written
        f.write(data)
    os.replace(tmp, path)
    summary["path"] = str(path)
    return summary
