"""Reference NLL on a tiny random Llama: equals a hand-computed teacher-forced loss, whatever the batching."""

from __future__ import annotations

import math

import pytest


class CharTokenizer:
    """Byte-level ids, eos = 257, pad = 256: enough tokenizer for `reference_nll`."""

    eos_token_id = 257
    pad_token_id = 256

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


@pytest.fixture(scope="module")
def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _by_hand(model, tok, prompt, ref, eos=True):
    import torch

    p = tok(prompt)["input_ids"]
    r = tok(ref)["input_ids"] + ([tok.eos_token_id] if eos else [])
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    return -sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(r)) / len(r)


def test_reference_nll_matches_hand_computation_and_ignores_batching(tiny_llama):
    from flywheel.evals.prompts.nll import reference_nll

    tok = CharTokenizer()
    prompts = ["Q: protein in lentils?\nA:", "Q: hi\nA:", "Q: a much longer question about tofu and calcium?\nA:"]
    refs = [" About 9 g.", " Hello there, how can I help you today?", " Yes"]
    expected = [_by_hand(tiny_llama, tok, p, r) for p, r in zip(prompts, refs)]
    one = reference_nll(tiny_llama, tok, prompts, refs, batch_size=1)
    three = reference_nll(tiny_llama, tok, prompts, refs, batch_size=3)  # right-padded batch
    assert one == pytest.approx(expected, abs=1e-4)
    assert three == pytest.approx(expected, abs=1e-4)
    assert all(math.isfinite(x) and x > 0 for x in one)


def test_long_inputs_are_cut_to_max_length(tiny_llama):
    from flywheel.evals.prompts.nll import reference_nll

    tok = CharTokenizer()
    out = reference_nll(tiny_llama, tok, ["x" * 300], ["y" * 300], max_length=64)
    assert math.isfinite(out[0])
    # kept: the last prompt token + the reference's first 63 tokens (its end-of-turn is cut off with the tail)
    assert out[0] == pytest.approx(_by_hand(tiny_llama, tok, "x", "y" * 63, eos=False), abs=1e-4)
