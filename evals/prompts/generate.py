"""Targets that answer prompts: a local HF model (base, or base + LoRA adapter) or an OpenAI-compatible endpoint.

Generation is batched, seeded and cached on disk. The cache key is (model identity, prompt messages, generation
params, repeat index): the model identity is the base weights' sha256 + the adapter weights' sha256 + the hash of
the tokenizer's chat template, so the messages determine the exact prompt text. A re-run only generates what
changed, and a fully cached run never loads the model at all (reference NLL is cached the same way).

Seeding: each batch is seeded from (seed, repeat, batch number). Greedy decoding (the default) does not depend on
it; sampled outputs are reproducible for the same set of cache misses (batch composition changes the stream).

Sampling parity: every sampling parameter is explicit (`GenParams.sampling()`): the local model, each endpoint
request and the published Modelfile (`flywheel publish`) get the same values, so a server's own defaults (llama.cpp
and Ollama apply `repeat_penalty` 1.1 unless told otherwise) never change what was evaluated.

Endpoints go through the `openai` SDK: it retries 408/409/429/5xx and connection errors with exponential backoff and
jitter (honouring Retry-After), takes separate connect/read timeouts, and passes server-specific fields
(`top_k`, `repeat_penalty`, `min_p`) through `extra_body`. An endpoint's cache key includes what the server reports
about its weights (`server_fingerprint`); a server that reports nothing is not cached unless a `revision` is pinned.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from flywheel.foundation.errors import FlywheelError, InputError
from flywheel.foundation.io import read_json, sha256_file, sha256_text
from flywheel.foundation.cache import JsonCache

Messages = list[dict[str, str]]
Progress = Callable[..., None]  # (advance, error=None): error is a failed case's message, reported as it happens


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0                # 0: off (Hugging Face, llama.cpp and Ollama agree on that meaning)
    min_p: float = 0.0            # off; llama.cpp's server default is 0.05
    repeat_penalty: float = 1.0   # Hugging Face's default; llama.cpp and Ollama default to 1.1
    seed: int = 0
    stop: tuple[str, ...] = ()    # extra stop strings (the chat template's end-of-turn tokens always stop)
    batch_size: int = 8

    def key(self) -> dict:
        """What changes outputs (batch_size does not, for greedy; it is left out so it can be tuned freely)."""
        d = asdict(self)
        d.pop("batch_size")
        d["stop"] = list(self.stop)
        if not self.do_sample:
            for k in ("temperature", "top_p", "top_k", "min_p", "seed"):
                d.pop(k)
        return d

    def sampling(self) -> dict:
        """The effective sampling parameters, spelled out: greedy is temperature 0 + top_k 1 (argmax on every
        server). What results.json records, what endpoints are sent, what the Modelfile pins."""
        greedy = not self.do_sample
        return {"temperature": 0.0 if greedy else self.temperature, "top_p": 1.0 if greedy else self.top_p,
                "top_k": 1 if greedy else self.top_k, "min_p": 0.0 if greedy else self.min_p,
                "repeat_penalty": self.repeat_penalty, "seed": self.seed, "max_tokens": self.max_new_tokens,
                "stop": list(self.stop)}

    def request(self, repeat: int = 0) -> tuple[dict, dict]:
        """(standard OpenAI fields, server-specific fields for `extra_body`) of one chat request."""
        s = self.sampling()
        std = {"temperature": s["temperature"], "top_p": s["top_p"], "max_tokens": s["max_tokens"],
               "seed": s["seed"] + 7919 * repeat}
        if s["stop"]:
            std["stop"] = s["stop"]
        # llama.cpp reads repeat_penalty, vLLM repetition_penalty; each server ignores the other's name.
        extra = {"top_k": s["top_k"], "min_p": s["min_p"], "repeat_penalty": s["repeat_penalty"],
                 "repetition_penalty": s["repeat_penalty"]}
        return std, extra

    def modelfile_parameters(self) -> dict:
        """The same sampling as Ollama `PARAMETER`s (its names: num_predict for max_tokens)."""
        s = self.sampling()
        return {"temperature": s["temperature"], "top_p": s["top_p"], "top_k": s["top_k"], "min_p": s["min_p"],
                "repeat_penalty": s["repeat_penalty"], "seed": s["seed"], "num_predict": s["max_tokens"]}


@dataclass
class Generation:
    text: str
    tokens: int | None
    latency_ms: float | None           # one request's wall time (endpoints)
    cached: bool = False
    error: str | None = None
    batch_latency_ms: float | None = None  # local batched generation: batch time / batch size
    retries: int = 0

    def cache_value(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "latency_ms": self.latency_ms,
                "batch_latency_ms": self.batch_latency_ms}

    @classmethod
    def from_cache(cls, hit: dict) -> "Generation":
        return cls(hit["text"], hit.get("tokens"), hit.get("latency_ms"), cached=True,
                   batch_latency_ms=hit.get("batch_latency_ms"))


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
    mp = d / "flywheel_adapter.json"
    meta = read_json(mp) if mp.exists() else {}
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

    def generate(self, prompts: Sequence[Messages], params: GenParams, cache: JsonCache, repeat: int = 0,
                 progress: Progress | None = None) -> list[Generation]:
        keys = [cache.key("gen", self.identity, m, params.key(), repeat) for m in prompts]
        out: list[Generation | None] = [None] * len(prompts)
        todo = []
        for i, k in enumerate(keys):
            hit = cache.get("gen", k)
            if hit is not None:
                out[i] = Generation.from_cache(hit)
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
                        cache.put("gen", keys[i], g.cache_value())
                    if progress:
                        progress(len(same[keys[i]]), error=g.error)
        return out  # type: ignore[return-value]

    def _generate_batch(self, texts: list[str], params: GenParams, seed: int) -> list[Generation]:
        import torch

        tok, model = self._tok, self._model
        tok.padding_side = "left"  # decoder-only: pad on the left so every row continues from its own prompt
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(seed)
        kw: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, do_sample=params.do_sample,
                                  eos_token_id=self._eos, pad_token_id=tok.pad_token_id)
        # Every knob explicit: the model's generation_config.json must not add a penalty the endpoints don't get.
        kw["repetition_penalty"] = params.repeat_penalty
        if params.do_sample:
            kw.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                      min_p=params.min_p or None)
        else:
            kw.update(temperature=None, top_p=None, top_k=None, min_p=None)
        if params.stop:
            kw.update(stop_strings=list(params.stop), tokenizer=tok)
        t0 = time.perf_counter()
        with torch.inference_mode():
            seq = model.generate(**enc, **kw)
        per_case_ms = (time.perf_counter() - t0) * 1000 / len(texts)
        new = seq[:, enc["input_ids"].shape[1]:]
        gens = []
        eos = set(self._eos)
        for row in new.tolist():
            n = next((j for j, t in enumerate(row) if t in eos), len(row))
            gens.append(Generation(tok.decode(row[:n], skip_special_tokens=True).strip(), n, None,
                                   batch_latency_ms=per_case_ms))
        return gens

    def nll(self, prompts: Sequence[Messages], references: Sequence[str], cache: JsonCache,
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

    def preference(self, prompts: Sequence[Messages], chosen: Sequence[str], rejected: Sequence[str],
                   cache: JsonCache, batch_size: int = 4, max_length: int = 384) -> list[float | None]:
        """Per pair, 1/0: does the target prefer the chosen answer (`nll.preference_win`)? Both answers go through
        `nll` in one batched, cached pass, so a chosen answer that is also a case's reference is scored once."""
        from flywheel.evals.prompts.nll import preference_win

        vals = self.nll(list(prompts) * 2, list(chosen) + list(rejected), cache, batch_size=batch_size,
                        max_length=max_length)
        n = len(prompts)
        return [preference_win(c, r) for c, r in zip(vals[:n], vals[n:])]


# -- OpenAI-compatible endpoint -------------------------------------------------------------------------------

@dataclass(frozen=True)
class EndpointOptions:
    """How hard to try an endpoint. The SDK retries 408/409/429/5xx and connection errors `max_retries` times with
    exponential backoff; a request that still fails is a failed case, and `max_consecutive_failures` of those in a
    row abort the run (a dead server should not cost one timeout per remaining case)."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_retries: int = 3
    max_consecutive_failures: int = 5
    extra_body: Mapping[str, Any] = field(default_factory=dict)  # merged over the request; a None value drops a field


class EndpointAborted(FlywheelError):
    """Too many consecutive failed requests: the target is down or stalled."""


@dataclass
class Reply:
    text: str
    tokens: int | None
    system_fingerprint: str | None
    retries: int


def openai_client(base_url: str, api_key: str | None, opts: EndpointOptions):
    import httpx
    from openai import OpenAI

    return OpenAI(base_url=base_url.rstrip("/"), api_key=api_key or "none", max_retries=opts.max_retries,
                  timeout=httpx.Timeout(opts.read_timeout_s, connect=opts.connect_timeout_s))


def _error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def check_endpoint(base_url: str, api_key: str | None = None, timeout: float = 5.0, what: str = "endpoint") -> None:
    """GET {base_url}/models: fail before any generation (and before any MLflow run) when the server is not there."""
    import openai

    client = openai_client(base_url, api_key, EndpointOptions(connect_timeout_s=timeout, read_timeout_s=timeout,
                                                              max_retries=0))
    try:
        client.models.list()
    except openai.APIError as e:
        raise InputError(f"{what} {base_url} is unreachable ({_error_text(e)[:200]}); start it or remove it from "
                         f"the config") from None


def chat_completion(client: Any, model: str, messages: Messages, params: GenParams, *, repeat: int = 0,
                    extra_body: Mapping[str, Any] | None = None) -> Reply:
    """One chat request with every sampling parameter explicit; raises openai.APIError (after the SDK's retries) or
    ValueError for a reply without a message."""
    std, extra = params.request(repeat)
    body = {k: v for k, v in {**extra, **(extra_body or {})}.items() if v is not None}
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, extra_body=body, **std)
    r = raw.parse()
    if not r.choices or r.choices[0].message is None:
        raise ValueError("reply has no choices[0].message")
    usage = getattr(r, "usage", None)
    return Reply((r.choices[0].message.content or "").strip(), getattr(usage, "completion_tokens", None),
                 getattr(r, "system_fingerprint", None), raw.retries_taken)


def server_fingerprint(client: Any, base_url: str, model: str) -> dict:
    """What the server reports about the weights it serves under `model`; {} when it reports nothing.

    Ollama: the model's digest (/api/tags). llama.cpp's server: the model entry's `meta` (/v1/models) and the model
    path (/props): path and shape, so an in-place re-export of the same shape is not seen (pin a `revision`). A bare
    id (llama-cpp-python, most proxies) identifies a name, not weights: not a fingerprint.
    """
    import openai

    fp: dict = {}
    try:
        entries = [m.model_dump() for m in client.models.list()]
    except openai.APIError:
        entries = []
    mine = [m for m in entries if m.get("id") == model] or (entries if len(entries) == 1 else [])
    if mine and mine[0].get("meta"):
        fp["meta"] = mine[0]["meta"]
    root = base_url.rstrip("/").removesuffix("/v1")
    for path, pick in (("/props", lambda d: {"model_path": d.get("model_path")} if d.get("model_path") else {}),
                       ("/api/tags", lambda d: next(({"digest": m["digest"]} for m in d.get("models", [])
                                                      if m.get("digest") and {m.get("name"), m.get("model")}
                                                      & {model, f"{model}:latest"}), {}))):
        try:
            resp = client.get(root + path, cast_to=object, options={"max_retries": 0})
        except openai.APIError:
            continue
        if isinstance(resp, dict):
            fp.update(pick(resp))
    return fp


class EndpointTarget:
    """Any OpenAI-compatible /v1 server (Ollama: http://localhost:11434/v1, llama.cpp: http://localhost:8080/v1).
    No reference NLL (no logprobs API is common to them all): its `nll` and `preference_accuracy` cells are absent
    and results.json says so.

    Cached only when the cache key can name the weights: the server's fingerprint, or a pinned `revision`."""

    kind = "openai"

    def __init__(self, name: str, base_url: str, model: str, api_key: str | None = None,
                 options: EndpointOptions | None = None, revision: str | None = None):
        self.name, self.base_url, self.model, self.api_key = name, base_url, model, api_key
        self.options = options or EndpointOptions()
        self.revision = revision
        self.fingerprint: dict = {}
        self.system_fingerprints: set[str] = set()
        self.identity = f"openai:{base_url.rstrip('/')}|{model}"
        self.cacheable = False
        self.loaded = False
        self._client = None
        self._checked = False
        self._consecutive = 0

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "endpoint": self.base_url, "model": self.model,
                "identity": self.identity, "revision": self.revision, "server_fingerprint": self.fingerprint,
                "system_fingerprints": sorted(self.system_fingerprints), "cached": self.cacheable,
                "options": {**asdict(self.options), "extra_body": dict(self.options.extra_body)}}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = openai_client(self.base_url, self.api_key, self.options)
        return self._client

    def check(self) -> None:
        """Reachable, and what identifies its weights (once per run: the identity must not change mid-run)."""
        if self._checked:
            return
        check_endpoint(self.base_url, self.api_key, timeout=self.options.connect_timeout_s,
                       what=f"target {self.name!r}: endpoint")
        self.fingerprint = server_fingerprint(self.client, self.base_url, self.model)
        if self.revision:
            self.identity += f"|revision={self.revision}"
        if self.fingerprint:
            self.identity += f"|weights={sha256_text(json.dumps(self.fingerprint, sort_keys=True, default=str))}"
        self.cacheable = bool(self.revision or self.fingerprint)
        self._checked = True

    def unload(self) -> None:
        pass

    def generate(self, prompts: Sequence[Messages], params: GenParams, cache: JsonCache, repeat: int = 0,
                 progress: Progress | None = None) -> list[Generation]:
        self.check()
        out = []
        for m in prompts:
            k = cache.key("gen", self.identity, m, params.key(), repeat) if self.cacheable else None
            hit = cache.get("gen", k) if k else None
            if hit is not None:
                g = Generation.from_cache(hit)
            else:
                g = self._request(m, params, repeat)
                if g.error is None and k:
                    cache.put("gen", k, g.cache_value())
            out.append(g)
            if progress:
                progress(1, error=g.error and f"target {self.name!r}: {g.error}")
        return out

    def _request(self, messages: Messages, params: GenParams, repeat: int) -> Generation:
        import openai

        t0 = time.perf_counter()
        try:
            r = chat_completion(self.client, self.model, messages, params, repeat=repeat,
                                extra_body=self.options.extra_body)
        except (openai.APIError, ValueError) as e:  # recorded per case, never dropped
            self._consecutive += 1
            if self._consecutive >= self.options.max_consecutive_failures:
                raise EndpointAborted(f"target {self.name!r} ({self.base_url}, model {self.model}): "
                                      f"{self._consecutive} consecutive requests failed, aborting the run; last "
                                      f"error: {_error_text(e)[:200]}") from None
            return Generation("", None, None, error=_error_text(e))
        self._consecutive = 0
        if r.system_fingerprint:
            self.system_fingerprints.add(r.system_fingerprint)
        return Generation(r.text, r.tokens, (time.perf_counter() - t0) * 1000, retries=r.retries)

    def nll(self, prompts, references, cache, batch_size=4, max_length=384, progress=None):  # noqa: ANN001
        if progress:
            progress(len(prompts))
        return [None] * len(prompts)

    def preference(self, prompts, chosen, rejected, cache, batch_size=4, max_length=384):  # noqa: ANN001
        return [None] * len(prompts)  # no teacher forcing over a chat API, like nll
