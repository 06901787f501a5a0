import pytest

from flywheel.mining.curate import exact_key, normalise, signatures
from flywheel.mining.dedupe import Deduper

A = ("Lentils have about 9 g of protein per 100 g cooked and are rich in iron and folate. Pair them with "
     "vitamin C to absorb the iron, and cook red lentils for fifteen minutes. A big batch on Sunday keeps "
     "well in the fridge for four days and makes quick lunches with rice, greens and a simple tahini sauce.")
B = A.replace("rich", "really")  # one word changed: J(3-shingles) ~ 0.9
C = "Tofu set with calcium sulfate is a good calcium source, and pressing it makes it crisp when fried."


def _add(d, seq, text, rating, group):
    t = normalise(text)
    sig = signatures([t], 128, 3)[0] if d.near else None
    return d.add(seq, exact_key(t), sig, rating, f"id{seq}", group)


def test_exact_near_and_best_rated_winner():
    d = Deduper(near=True, threshold=0.8)
    assert _add(d, 1, A, 4, "g1") == (0, "new")
    assert _add(d, 2, "  " + A.upper(), 5, "g2") == (0, "exact")  # case/whitespace: same text
    assert _add(d, 3, B, 4, "g3") == (0, "near")
    assert _add(d, 4, C, 3, "g4") == (1, "new")
    assert len(d) == 2
    assert d.winner(0) == 2  # best rating wins; the cluster keeps its first member's group for the split
    assert d.rep_group[0] == "g1"
    assert d.duplicate_reason(0, exact_key(normalise(A))) == "duplicate"
    assert d.duplicate_reason(0, exact_key(normalise(B))) == "near_duplicate"


def test_ties_keep_the_earliest_and_exact_only_mode():
    d = Deduper(near=False)
    _add(d, 1, A, 5, "g1")
    _add(d, 2, A, 5, "g2")
    assert d.winner(0) == 1
    assert _add(d, 3, B, 5, "g3")[1] == "new"  # no MinHash: near-duplicates survive


@pytest.mark.parametrize("threshold", [0.8, 0.9])
def test_unrelated_texts_do_not_merge(threshold):
    d = Deduper(near=True, threshold=threshold)
    texts = [f"Answer number {i} talks about {w} and nothing else at all, {i * 7} times over."
             for i, w in enumerate(["beans", "rice", "kale", "oats", "tofu", "chia"])]
    assert [_add(d, i, t, 4, str(i))[1] for i, t in enumerate(texts)].count("new") >= 5
