"""Targets that answer prompts: a local HF model (base, or base + LoRA adapter) or an OpenAI-compatible endpoint.

Generation is batched, seeded and cached on disk. The cache key is (model identity, prompt messages, generation
params, repeat index): the model identity is the base weights' sha256 + the adapter weights' sha256 + the hash of
the tokenizer's chat template, so the messages determine the exact prompt text. A re-run only generates what
changed, and a fully cached run never loads the model at all (reference NLL is cached the same way).

Seeding: each batch is seeded from (seed, repeat, batch number). Greedy decoding (the default) does not depend on
it; sampled outputs are reproducible for the same set of cache misses (batch composition changes the stream).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from flywheel.foundation.errors import InputError
from flywheel.foundation.io import atomic_write_text, dumps, sha256_file, sha256_text

Messages = list[dict[str, str]]
Progress = Callable[[int], None]


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 8

    def key(self) -> dict:
        """What changes outputs (batch_size does not, for greedy; it is left out so it can be tuned freely)."""
        d = asdict(self)
        d.pop("batch_size")
        if not self.do_sample:
            d.pop("temperature"), d.pop("top_p"), d.pop("seed")
        return d


@dataclass
class Generation:
    text: str
    tokens: int | None
    latency_ms: float | None
    cached: bool = False
    error: str | None = None


class DiskCache:
    """One small JSON file per key under `root/<kind>/<k[:2]>/<k>.json`, written atomically."""

    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(*parts: Any) -> str:
        return sha256_text(dumps(list(parts)))

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.json"

    def get(self, kind: str, key: str) -> dict | None:
        if not self.enabled:
            self.misses += 1
            return None
        p = self._path(kind, key)
        try:
            value = json.loads(p.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, kind: str, key: str, value: dict) -> None:
        if self.enabled:
            atomic_write_text(self._path(kind, key), json.dumps(value, ensure_ascii=False))


# -- adapters -------------------------------------------------------------------------------------------------

@dataclass
class AdapterInfo:
    path: Path
    sha256: str
    meta: dict = field(default_factory=dict)  # flywheel_adapter.json, {} if absent


def find_adapter_dir(path: str | Path) -> Path:
    """The folder holding adapter_config.json: `path` itself, `path/adapter`, or the only one below it."""
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return p
    if (p / "adapter" / "adapter_config.json").exists():
        return p / "adapter"
    found = sorted(q.parent for q in p.rglob("adapter_config.json")) if p.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise InputError(f"{p}: no adapter here (expected adapter_config.json"
                     f"{'; several candidates: ' + ', '.join(map(str, found[:3])) if found else ''})")


def load_adapter(path: str | Path) -> AdapterInfo:
    d = find_adapter_dir(path)
    weights = next((d / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (d / n).exists()), None)
    if weights is None:
        raise InputError(f"{d}: adapter_config.json but no adapter_model.safetensors")
    meta = {}
    mp = d / "flywheel_adapter.json"
    if mp.exists():
        try:
            meta = json.loads(mp.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{mp}: invalid JSON ({e.msg})") from None
    return AdapterInfo(path=d, sha256=sha256_file(weights), meta=meta)


def check_adapter_base(adapter: AdapterInfo, base_sha256: str, base_name: str, target: str) -> None:
    """Refuse, before any generation, an adapter trained on another base: its deltas would be noise."""
    recorded = adapter.meta.get("base_model_sha256")
    if recorded and recorded != base_sha256:
        raise InputError(f"target {target!r}: adapter {adapter.path} was trained on base "
                         f"{adapter.meta.get('base_model', '?')} (sha256 {recorded[:12]}…) but the target base is "
                         f"{base_name} (sha256 {base_sha256[:12]}…); set the target's `base` to the adapter's base")


def _template_hash(tok_dir: Path) -> str:
    parts = []
    for n in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json", "tokenizer.json"):
        f = tok_dir / n
        if f.exists():
            parts.append(f"{n}:{sha256_file(f)}")
    return sha256_text("|".join(parts))


# -- local Hugging Face target --------------------------------------------------------------------------------

class HFTarget:
    """A base model directory, optionally with a LoRA adapter merged in. Loads lazily, on the first cache miss."""

    kind = "hf"

    def __init__(self, name: str, base_name: str, base_path: str | Path, base_sha256: str,
                 adapter: AdapterInfo | None = None, device: str = "cpu"):
        self.name = name
        self.base_name = base_name
        self.base_path = Path(base_path)
        self.base_sha256 = base_sha256
        self.adapter = adapter
        self.device = device
        if adapter is not None:
            check_adapter_base(adapter, base_sha256, base_name, name)
        # The adapter dir carries the tokenizer it was trained with (chat template included) when it has one.
        tok_dir = adapter.path if adapter and (adapter.path / "tokenizer_config.json").exists() else self.base_path
        self.tokenizer_dir = tok_dir
        self.identity = (f"hf:base={base_sha256};adapter={adapter.sha256 if adapter else 'none'};"
                         f"template={_template_hash(tok_dir)}")
        self._model = None
        self._tok = None
        self._eos: list[int] = []

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "base": self.base_name, "base_sha256": self.base_sha256,
                "adapter": str(self.adapter.path) if self.adapter else None,
                "adapter_sha256": self.adapter.sha256 if self.adapter else None,
                "adapter_meta": self.adapter.meta if self.adapter else None, "identity": self.identity}

    def check(self) -> None:
        if not (self.base_path / "config.json").exists():
            raise InputError(f"target {self.name!r}: base {self.base_path} has no config.json")

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(self.base_path), dtype=torch.float32)
        if self.adapter is not None:
            from peft import PeftModel

            # Merged: same outputs as the PEFT wrapper, one matmul per layer instead of three.
            model = PeftModel.from_pretrained(model, str(self.adapter.path)).merge_and_unload()
        model.to(self.device).eval()
        eos = {tok.eos_token_id}
        for t in (self.adapter.meta.get("eos_tokens") if self.adapter else None) or ["<|im_end|>"]:
            tid = tok.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != tok.unk_token_id:
                eos.add(tid)
        self._eos = sorted(e for e in eos if e is not None)
        self._tok, self._model = tok, model

    def unload(self) -> None:
        self._model = self._tok = None

    def prompt_text(self, messages: Messages) -> str:
        self.load()
        return self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def generate(self, prompts: Sequence[Messages], params: GenParams, cache: DiskCache, repeat: int = 0,
                 progress: Progress | None = None) -> list[Generation]:
        keys = [cache.key("gen", self.identity, m, params.key(), repeat) for m in prompts]
        out: list[Generation | None] = [None] * len(prompts)
        todo = []
        for i, k in enumerate(keys):
            hit = cache.get("gen", k)
            if hit is not None:
                out[i] = Generation(hit["text"], hit.get("tokens"), hit.get("latency_ms"), cached=True)
                if progress:
                    progress(1)
            else:
                todo.append(i)
        if todo:
            self.load()
            # Mined eval splits repeat a question once per rated reply: generate each distinct prompt once.
            same: dict[str, list[int]] = {}
            for i in todo:
                same.setdefault(keys[i], []).append(i)
            uniq = [group[0] for group in same.values()]
            texts = {i: self.prompt_text(prompts[i]) for i in uniq}
            uniq.sort(key=lambda i: len(texts[i]))  # similar lengths per batch: less padding
            for b, start in enumerate(range(0, len(uniq), params.batch_size)):
                idx = uniq[start:start + params.batch_size]
                try:
                    gens = self._generate_batch([texts[i] for i in idx], params, seed=params.seed + 7919 * repeat + b)
                except Exception as e:  # noqa: BLE001 - recorded per case, never dropped
                    gens = [Generation("", None, None, error=f"{type(e).__name__}: {e}"[:500]) for _ in idx]
                for i, g in zip(idx, gens):
                    for j in same[keys[i]]:
                        out[j] = g
                    if g.error is None:
                        cache.put("gen", keys[i], {"text": g.text, "tokens": g.tokens, "latency_ms": g.latency_ms})
                    if progress:
                        progress(len(same[keys[i]]))
        return out  # type: ignore[return-value]

    def _generate_batch(self, texts: list[str], params: GenParams, seed: int) -> list[Generation]:
        import torch

        tok, model = self._tok, self._model
        tok.padding_side = "left"  # decoder-only: pad on the left so every row continues from its own prompt
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(seed)
        kw: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, do_sample=params.do_sample,
                                  eos_token_id=self._eos, pad_token_id=tok.pad_token_id)
        if params.do_sample:
            kw.update(temperature=params.temperature, top_p=params.top_p)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            seq = model.generate(**enc, **kw)
        per_case_ms = (time.perf_counter() - t0) * 1000 / len(texts)
        new = seq[:, enc["input_ids"].shape[1]:]
        gens = []
        eos = set(self._eos)
        for row in new.tolist():
            n = next((j for j, t in enumerate(row) if t in eos), len(row))
            gens.append(Generation(tok.decode(row[:n], skip_special_tokens=True).strip(), n, per_case_ms))
        return gens

    def nll(self, prompts: Sequence[Messages], references: Sequence[str], cache: DiskCache,
            batch_size: int = 4, max_length: int = 384, progress: Progress | None = None) -> list[float | None]:
        from flywheel.evals.prompts.nll import reference_nll

        keys = [cache.key("nll", self.identity, m, r, max_length) for m, r in zip(prompts, references)]
        out: list[float | None] = [None] * len(prompts)
        todo = []
        for i, k in enumerate(keys):
            hit = cache.get("nll", k)
            if hit is not None:
                out[i] = hit["nll"]
            else:
                todo.append(i)
        if todo:
            self.load()
            vals = reference_nll(self._model, self._tok, [self.prompt_text(prompts[i]) for i in todo],
                                 [references[i] for i in todo], eos_token_id=self._eos[-1] if self._eos else None,
                                 batch_size=batch_size, max_length=max_length)
            for i, v in zip(todo, vals):
                out[i] = v
                cache.put("nll", keys[i], {"nll": v})
        if progress:
            progress(len(prompts))
        return out


# -- OpenAI-compatible endpoint -------------------------------------------------------------------------------

def _http_json(url: str, payload: dict | None, api_key: str | None, timeout: float) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if payload is not None else "GET",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


def check_endpoint(base_url: str, api_key: str | None = None, timeout: float = 5.0, what: str = "endpoint") -> None:
    """GET {base_url}/models: fail before any generation when the server is not there."""
    try:
        _http_json(base_url.rstrip("/") + "/models", None, api_key, timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise InputError(f"{what} {base_url} is unreachable ({reason}); start it or remove it from the config") \
            from None


def chat_completion(base_url: str, model: str, messages: Messages, *, api_key: str | None = None,
                    max_tokens: int = 48, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                    timeout: float = 60.0) -> tuple[str, int | None]:
    payload = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
               "top_p": top_p}
    if seed is not None:
        payload["seed"] = seed
    r = _http_json(base_url.rstrip("/") + "/chat/completions", payload, api_key, timeout)
    text = r["choices"][0]["message"]["content"] or ""
    return text.strip(), (r.get("usage") or {}).get("completion_tokens")


class EndpointTarget:
    """Any OpenAI-compatible /v1 server (Ollama: http://localhost:11434/v1). No reference NLL (no logprobs API
    is common to them all): its `nll` cells are absent and results.json says so."""

    kind = "openai"

    def __init__(self, name: str, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0):
        self.name, self.base_url, self.model, self.api_key, self.timeout = name, base_url, model, api_key, timeout
        self.identity = f"openai:{base_url.rstrip('/')}|{model}"
        self.loaded = False

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "endpoint": self.base_url, "model": self.model,
                "identity": self.identity}

    def check(self) -> None:
        check_endpoint(self.base_url, self.api_key, what=f"target {self.name!r}: endpoint")

    def unload(self) -> None:
        pass

    def generate(self, prompts: Sequence[Messages], params: GenParams, cache: DiskCache, repeat: int = 0,
                 progress: Progress | None = None) -> list[Generation]:
        out = []
        for m in prompts:
            k = cache.key("gen", self.identity, m, params.key(), repeat)
            hit = cache.get("gen", k)
            if hit is not None:
                out.append(Generation(hit["text"], hit.get("tokens"), hit.get("latency_ms"), cached=True))
            else:
                t0 = time.perf_counter()
                try:
                    text, ntok = chat_completion(
                        self.base_url, self.model, m, api_key=self.api_key, max_tokens=params.max_new_tokens,
                        temperature=params.temperature if params.do_sample else 0.0,
                        top_p=params.top_p if params.do_sample else 1.0,
                        seed=params.seed + 7919 * repeat, timeout=self.timeout)
                    g = Generation(text, ntok, (time.perf_counter() - t0) * 1000)
                    cache.put("gen", k, {"text": g.text, "tokens": g.tokens, "latency_ms": g.latency_ms})
                except Exception as e:  # noqa: BLE001 - recorded per case, never dropped
                    g = Generation("", None, None, error=f"{type(e).__name__}: {e}"[:500])
                out.append(g)
            if progress:
                progress(1)
        return out

    def nll(self, prompts, references, cache, batch_size=4, max_length=384, progress=None):  # noqa: ANN001
        if progress:
            progress(len(prompts))
        return [None] * len(prompts)
