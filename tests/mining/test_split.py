from flywheel.mining.split import split_of


def test_split_is_deterministic_and_close_to_fraction():
    groups = [f"conv-{i}" for i in range(4000)]
    a = [split_of(g, 0.1) for g in groups]
    assert a == [split_of(g, 0.1) for g in groups]
    frac = a.count("eval") / len(a)
    assert 0.08 < frac < 0.12
    assert {split_of(g, 0.0) for g in groups[:50]} == {"train"}
    # the salt reshuffles (a new split when wanted), the key alone decides otherwise
    assert [split_of(g, 0.5, "x") for g in groups[:200]] != [split_of(g, 0.5) for g in groups[:200]]
