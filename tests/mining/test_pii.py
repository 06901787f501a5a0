"""PII redaction: recall on a planted set (the demo generator's PII + hand-picked formats), precision on tricky
negatives (versions, dates, prices, ISBNs, non-Luhn digit runs)."""

from collections import Counter

from flywheel.mining import pii
from flywheel.mining.demo_logs import generate_demo_records

POSITIVES = [
    ("email", "write to first.last+tag@sub.example.co.uk please"),
    ("phone", "call +1 (415) 555-2671 tomorrow"),
    ("phone", "my number is (212) 555-0187"),
    ("phone", "ring +44 20 7946 0958 after six"),
    ("card", "card 4111 1111 1111 1111 expires soon"),
    ("card", "amex 3782-822463-10005"),
    ("iban", "IBAN GB82 WEST 1234 5698 7654 32 for the refund"),
    ("iban", "pay DE89370400440532013000 today"),
    ("ip", "server at 203.0.113.42 is down"),
    ("ip", "v6 address 2001:db8:85a3::8a2e:370:7334 works"),
]
NEGATIVES = [
    "Python 3.11.7 fixed it", "on 2023-02-07 at 10:30:45", "it costs $1,299.99", "ISBN 978-3-16-148410-0",
    "order 1234 5678 9012 3456 (not Luhn)", "see app.py and v1.2.3", "in 1999 2000 and 2001",
    "between 100 and 200 g per 300 kcal", "list: 1, 2, 3, 4", "ratio 16:9 and time 12:30",
    "DE00 1234 5678 9012 3456 78 is not a valid IBAN", "Call me at noon",
]


def test_recall_and_precision_on_planted_set():
    planted = [(k, s) for k, s in POSITIVES]
    _, summary = generate_demo_records(n=300, seed=3)
    planted += [(p["kind"], f"text {p['value']} more") for p in summary["pii"]]
    hits = 0
    for kind, text in planted:
        counts = Counter()
        out = pii.redact(text, counts)
        hits += counts[kind] == 1 and f"<{kind.upper()}>" in out
    recall = hits / len(planted)
    assert recall == 1.0, recall
    false = [t for t in NEGATIVES if pii.redact(t) != t]
    assert false == []


def test_checksums():
    assert pii.luhn_ok("4111111111111111") and not pii.luhn_ok("4111111111111112")
    assert pii.iban_ok("GB82 WEST 1234 5698 7654 32") and not pii.iban_ok("GB00 WEST 1234 5698 7654 32")


def test_placeholders_are_typed_and_text_kept():
    out = pii.redact("mail a@b.org or call +1 415 555 2671, ok?")
    assert out == "mail <EMAIL> or call <PHONE>, ok?"
    assert pii.redact("") == "" and pii.redact("no pii here") == "no pii here"
