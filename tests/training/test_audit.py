"""The loss-mask audit on SmolLM2's real tokenizer: what is trained, and refusals when masks are broken."""

import pytest

from flywheel.foundation.errors import InputError
from tests.training.conftest import CAPITALS, record
from flywheel.training.audit import (IGNORE, audit, check_audit, render_masked, tokenize_conversations,
                            training_template)

pytestmark = pytest.mark.slow  # loads a tokenizer (transformers import)

RECORDS = [record(i, *CAPITALS[i]) for i in range(6)]
CONVS = [r["messages"] for r in RECORDS]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from flywheel.training.models import resolve_base_model

    return AutoTokenizer.from_pretrained(str(resolve_base_model("smollm2-135m-instruct").path))


def _audit(tok, template, **kw):
    t = tokenize_conversations(RECORDS, tok, template, max_length=kw.pop("max_length", 256), **kw)
    return t, audit(t, tok, "test template")


def test_smollm2_chatml_gets_a_training_variant_that_trains_im_end(tokenizer):
    tmpl, note = training_template(tokenizer, CONVS)
    assert tmpl is not None and "smollm2-chatml" in note
    t, rep = _audit(tokenizer, tmpl)
    assert rep["ok"] and rep["zero_trained_examples"] == 0
    assert rep["eot_token"] == "<|im_end|>" and rep["examples_with_eot_trained"] == len(RECORDS)
    row = t.rows[0]
    # Exactly the answer + <|im_end|> is trained; the prompt, the system turn and the newline after it are not.
    trained = tokenizer.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
    assert trained == RECORDS[0]["messages"][-1]["content"] + "<|im_end|>"
    assert row["input_ids"] == tokenizer.apply_chat_template(CONVS[0], tokenize=True, return_dict=True)["input_ids"]
    shown = render_masked(row, tokenizer)
    assert shown.startswith("[[<|im_start|>system") and "]]Flywheel fact" in shown and shown.endswith("[[\n]]")


def test_template_without_generation_markers_is_refused(tokenizer):
    # A ChatML template no training variant matches (different default system prompt): the mask stays empty.
    own = tokenizer.chat_template.replace("named SmolLM", "named Bob")
    tokenizer_copy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer_copy.chat_template = own
    convs = [[m for m in c if m["role"] != "system"] for c in CONVS]
    tmpl, note = training_template(tokenizer_copy, convs)
    assert tmpl is None and "WITHOUT generation markers" in note
    recs = [{"id": str(i), "messages": c} for i, c in enumerate(convs)]
    t = tokenize_conversations(recs, tokenizer_copy, tmpl, max_length=256)
    rep = audit(t, tokenizer_copy, note)
    assert not rep["ok"] and rep["zero_trained_examples"] == len(recs)
    with pytest.raises(InputError, match="train on no token at all"):
        check_audit(rep)


def test_end_of_turn_outside_the_generation_block_is_refused(tokenizer):
    # The classic silent bug: markers around the content only, so <|im_end|> is never trained -> never stops.
    bad = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
           "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>\\n' }}{% else %}"
           "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
           "{% endfor %}")
    _, rep = _audit(tokenizer, bad)
    assert rep["zero_trained_examples"] == 0 and rep["eot_trained"] == 0
    with pytest.raises(InputError, match="end-of-turn token '<\\|im_end\\|>' is never trained"):
        check_audit(rep)


def test_overlong_examples_truncated_or_dropped_and_counted(tokenizer):
    tmpl, _ = training_template(tokenizer, CONVS)
    t, rep = _audit(tokenizer, tmpl, max_length=40)  # prompt ~25 tokens, answer ~18
    assert rep["truncated"] == len(RECORDS) and all(len(r["input_ids"]) == 40 for r in t.rows)
    t, rep = _audit(tokenizer, tmpl, max_length=40, overlong="drop")
    assert rep["dropped_overlong"] == len(RECORDS) and rep["examples_used"] == 0
    with pytest.raises(InputError, match="no example left"):
        check_audit(rep)
    t, rep = _audit(tokenizer, tmpl, max_length=20)  # the answer starts after token 20: nothing left to learn
    assert rep["dropped_truncated_to_nothing"] == len(RECORDS)


def test_full_sequence_loss_trains_everything(tokenizer):
    tmpl, note = training_template(tokenizer, CONVS, assistant_only_loss=False)
    assert tmpl is None
    t = tokenize_conversations(RECORDS, tokenizer, None, max_length=256, assistant_only_loss=False)
    rep = audit(t, tokenizer, note)
    assert rep["ok"] and rep["trained_fraction"] == 1.0
