"""Offline model catalog: each default loads, the ONNX rebuild matches onnxruntime, preparation is race-safe."""

from __future__ import annotations

import multiprocessing as mp
import warnings

import numpy as np
import pytest

from flywheel.foundation.errors import InputError

pytestmark = pytest.mark.slow

TEXTS = ["A plane is taking off.", "An air plane is taking off.", "the crystalline lens in vertebrates .", "ok"]


def test_minilm_l6_loads_and_encodes():
    from flywheel.evals.embeddings.models import load_embedding_model

    m = load_embedding_model("all-MiniLM-L6-v2")
    e = m.encode(TEXTS, normalize_embeddings=True)
    assert e.shape == (4, 384)
    assert e[0] @ e[1] > 0.8 > e[0] @ e[2]


def test_minilm_l3_rebuilt_from_onnx_matches_onnxruntime():
    import onnxruntime as ort

    from flywheel.evals.embeddings.models import load_embedding_model, onnx_l3_path

    m = load_embedding_model("paraphrase-MiniLM-L3-v2")
    ours = m.encode(TEXTS)
    tok = m.tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="np")
    sess = ort.InferenceSession(str(onnx_l3_path()), providers=["CPUExecutionProvider"])
    # Output "461" is the graph's mean-pooled sentence embedding.
    ref = sess.run(["461"], {"input_ids": tok["input_ids"].astype(np.int64),
                             "attention_mask": tok["attention_mask"].astype(np.int64)})[0]
    assert ours.shape == ref.shape == (4, 384)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_static_matches_the_packages_own_encoder():
    import static_model

    from flywheel.evals.embeddings.models import load_embedding_model

    m = load_embedding_model("static")  # alias
    ours = m.encode(TEXTS)
    ref = np.asarray(static_model.get_embeddings(TEXTS))
    assert ours.shape == (4, 64)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_mpnet_loads_or_says_make_models_mpnet():
    from flywheel.evals.embeddings.models import load_embedding_model

    try:
        m = load_embedding_model("all-mpnet-base-v2")
    except InputError as e:
        assert "make models-mpnet" in str(e)
        return
    assert m.get_embedding_dimension() == 768


def test_local_path_and_bad_path(tmp_path):
    from flywheel.evals.embeddings.models import load_with_info, resolve_model

    path = resolve_model("all-MiniLM-L6-v2").path
    m, info = load_with_info(path)
    assert info.source == "local" and m.get_embedding_dimension() == 384
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="does not load"):
        load_with_info(str(tmp_path / "junk"))
    with pytest.raises(InputError, match="does not load"):
        load_with_info("no-such-org/no-such-model")


def _prepare_static(q):
    from flywheel.evals.embeddings.models import catalog_entry, prepare

    q.put(str(prepare(catalog_entry("static-64"))))


def test_preparation_is_once_and_race_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_CACHE", str(tmp_path / "cache"))
    # spawn, not fork: a child forked after torch ran an OpenMP region here hangs in its first parallel op
    # (seen with OMP_NUM_THREADS=2, which `make test` sets).
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        procs = [ctx.Process(target=_prepare_static, args=(q,)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    paths = {q.get(timeout=5) for _ in procs}
    assert len(paths) == 1
    models = tmp_path / "cache" / "embeddings" / "models"
    # one finished directory, no temp leftovers
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == ["static-64"]
    mtime = (models / "static-64" / "flywheel_prepared.json").stat().st_mtime
    from flywheel.evals.embeddings.models import catalog_entry, prepare

    prepare(catalog_entry("static-64"))  # second call: no rebuild
    assert (models / "static-64" / "flywheel_prepared.json").stat().st_mtime == mtime
