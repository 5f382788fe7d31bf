import json

import pytest
import torch

from course_utils.evaluate import (
    field_scores,
    normalize_currency,
    normalize_date,
    normalize_number,
    receipt_facts,
    task_metrics,
    validity,
)
from course_utils.receipts import RECEIPT_SCHEMA

GOLD = {
    "merchant": "Café Nord",
    "date": "2024-02-01",
    "currency": "EUR",
    "items": [{"name": "Tea", "qty": 2, "unit_price": 1.5}, {"name": "Cake", "qty": 1, "unit_price": 3.2}],
    "subtotal": 6.2,
    "tax": 1.18,
    "total": 7.38,
}


@pytest.mark.parametrize(
    "raw, expected",
    [
        (7.38, 7.38),
        ("7.38", 7.38),
        ("1,234.50", 1234.5),
        ("12,30 €", 12.3),
        ("$15", 15.0),
        ("1.234,56", 1234.56),  # European: the last separator is the decimal one
        ("12,5", 12.5),
        ("Rp 45.500", 45500.0),  # CORD-v2: dots group thousands
        ("1.234.000", 1234000.0),
        ("1,234", 1234.0),
        ("-3.50", -3.5),
        ("1.2.3,4,5", None),  # not a number: two decimal marks
        ("0.125", 0.12),  # a leading zero never groups thousands
        (".125", 0.12),
        ("-0.500", -0.5),
        ("12.5.2023", None),  # a date, not a number
        ("1.23.456", None),  # groups of three or nothing
        ("1,5,3", None),
        ("1 234,56", 1234.56),
        ("12.", 12.0),
        (3, 3.0),
        ("n/a", None),
        (True, None),
        # what a model or a receipt may also write
        ("1e5", None),  # digits split by a letter: not one number (it was read as 15)
        ("1/2", None),  # a fraction is not an amount (it was read as 12)
        ("\u22123.50", -3.5),  # U+2212, the typographic minus
        ("(1.50)", -1.5),  # accounting notation for a negative amount
        ("€ -2,00", -2.0),
        ("-€12.50", -12.5),
        ("Ref-A 12.50", 12.5),  # a hyphen elsewhere is not a sign
        ("-Rp 45.500", -45500.0),  # any short currency mark between the sign and the digits
        ("-R$ 12,50", -12.5),
        ("-US$ 12.50", -12.5),
        ("-Fr. 12.50", -12.5),
        ("-₹500", -500.0),
        ("2,00-", -2.0),  # a trailing minus (German and SAP receipts: a discount)
        ("Rabatt 2,00-", -2.0),
        ("(12.50 EUR)", 12.5),  # parentheses mean negative around the amount alone
        ("Price (EUR 12.50)", 12.5),
        ("1\u202f234,56", 1234.56),  # narrow no-break space groups thousands (French receipts)
        ("1'234.50", 1234.5),  # Swiss grouping
        ("12 500", 12500.0),
        ("12 5", None),  # a space groups thousands only before three digits
        pytest.param(10**400, None, id="huge-int"),  # too large for a float: not a traceback
        pytest.param("9" * 400, None, id="huge-text"),
        (float("nan"), None),
        (float("inf"), None),
    ],
)
def test_numbers_normalise(raw, expected):
    assert normalize_number(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("2024-02-01", "2024-02-01"),
        ("01.02.2024", "2024-02-01"),
        ("02/01/2024", "2024-02-01"),
        ("Feb 1", None),
        (None, None),
        ("2024-13-01", None),  # no 13th month
        ("31.04.2024", None),  # April has 30 days
        ("02/30/2024", None),
        ("29.02.2024", "2024-02-29"),
        (" 2024-2-1 ", "2024-02-01"),
    ],
)
def test_dates_normalise(raw, expected):
    assert normalize_date(raw) == expected


def test_currency_and_text_normalise():
    assert [normalize_currency(c) for c in ("eur", "€", " usd ", "£")] == ["EUR", "EUR", "USD", "GBP"]
    assert ("merchant", "café nord") in receipt_facts(dict(GOLD, merchant="  CAFÉ   Nord "))


def test_perfect_and_partial_predictions_by_hand():
    assert field_scores(GOLD, GOLD) == {
        "matched": 8,
        "predicted": 8,
        "expected": 8,
        "exact": True,
        "per_field": field_scores(GOLD, GOLD)["per_field"],
    }
    # wrong merchant, date printed differently (still right), one item missing, total wrong
    partial = dict(GOLD, merchant="Cafe Nord", date="01.02.2024", items=GOLD["items"][:1], total=7.0)
    s = field_scores(partial, GOLD)
    # facts: merchant, date, currency, subtotal, tax, total + items. Predicted 7, expected 8.
    # matched: date, currency, subtotal, tax, 1 item = 5
    assert (s["matched"], s["predicted"], s["expected"], s["exact"]) == (5, 7, 8, False)
    assert s["per_field"]["item"] == {"predicted": 1, "expected": 2, "matched": 1}


def test_task_metrics_with_malformed_json_by_hand():
    replies = [
        json.dumps(GOLD),
        "```json\n" + json.dumps(dict(GOLD, total=1)) + "\n```",
        "{broken",
        "no json here",
    ]
    m = task_metrics(replies, [GOLD] * 4, RECEIPT_SCHEMA)
    assert m["json_valid"] == 0.5 and m["schema_valid"] == 0.5 and m["exact_match"] == 0.25
    # matched 8 + 7 = 15; predicted 8 + 8 = 16; expected 32
    assert m["field_precision"] == round(15 / 16, 4) and m["field_recall"] == round(15 / 32, 4)
    assert m["field_f1"] == round(2 * (15 / 16) * (15 / 32) / (15 / 16 + 15 / 32), 4)
    assert m["per_field"]["total"] == {
        "precision": 0.5,
        "recall": 0.25,
        "f1": round(2 * 0.5 * 0.25 / 0.75, 4),
    }
    with pytest.raises(ValueError, match="targets"):
        task_metrics(replies, [GOLD])


def test_validity_counts():
    assert validity(['{"a": 1}', "x", '{"a"'], None) == {"json_valid": 1 / 3, "n": 3}


def test_a_fresh_adapter_is_detected_as_a_no_op_and_training_changes_it(stand_in_dir, tmp_path):
    from course_utils.evaluate import adapter_effect, heldout_loss
    from course_utils.models import load
    from course_utils.receipts import load_local, mix_modalities
    from course_utils.train import build_trainer, preset_for

    records = mix_modalities(load_local("train")[:8], 0.5, 0)
    loaded = load("cpu-tiny", stand_in_dir=stand_in_dir)
    run = build_trainer(
        loaded.model,
        loaded.processor,
        records,
        None,
        preset_for("cpu-tiny", max_steps=3, save_steps=100, per_device_train_batch_size=4),
        tmp_path,
        progress=False,
    )
    assert adapter_effect(run.model, loaded.processor, records[:2]) == 0.0  # LoRA B starts at zero
    before = heldout_loss(run.model, loaded.processor, records[:4])
    run.trainer.train()
    assert adapter_effect(run.model, loaded.processor, records[:2]) > 0.01
    after = heldout_loss(run.model, loaded.processor, records[:4])
    assert after["loss"] < before["loss"] and after["perplexity"] < before["perplexity"]
    assert before["tokens"] == after["tokens"] > 0


# --- Small 4: reasoning on and off (lesson 05) --------------------------------------------------------


@pytest.mark.parametrize(
    "reply, thinking, answer, closed",
    [
        ('{"total": 3}', None, '{"total": 3}', True),
        ('[THINK]1 + 2 = 3[/THINK]{"total": 3}', "1 + 2 = 3", '{"total": 3}', True),
        ("[THINK]still counting", "still counting", "", False),  # cut off by the token limit
        ("ok [THINK]x[/THINK] done", "x", "ok  done", True),
    ],
)
def test_split_thinking_keeps_the_trace_apart(reply, thinking, answer, closed):
    from course_utils.chat import split_thinking

    split = split_thinking(reply)
    assert (split.thinking, split.answer, split.closed) == (thinking, answer, closed)


class _ThinksWhenAsked:
    """Stands in for a model: replies with a [THINK] trace when the prompt's model settings say
    reasoning_effort "high", else with the answer alone — so the test sees the switch reach the prompt."""

    device = "cpu"
    dtype = None

    def __init__(self, tokenizer):
        vocab = tokenizer.get_vocab()
        self.tokenizer = tokenizer
        words = tokenizer("1 plus 2", add_special_tokens=False)["input_ids"]
        self.answer = tokenizer('{"total": 3}', add_special_tokens=False)["input_ids"]
        self.trace = [vocab["[THINK]"], *words, vocab["[/THINK]"]]
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def generate(self, input_ids, max_new_tokens, **_):
        rows = []
        for row in input_ids.tolist():
            high = '"reasoning_effort": "high"' in self.tokenizer.decode(row, skip_special_tokens=False)
            reply = (self.trace if high else []) + self.answer + [self.eos]
            rows.append(row + reply + [self.pad] * (max_new_tokens - len(reply)))
        return torch.tensor(rows)


def test_compare_reasoning_measures_the_trace_the_switch_asks_for(stand_in_dir):
    from transformers import AutoProcessor

    from course_utils.evaluate import compare_reasoning

    small4 = AutoProcessor.from_pretrained(stand_in_dir / "tiny-mistral-small-4")
    conversations = [[{"role": "user", "content": f"Receipt {k}: tea 1, cake 2"}] for k in range(3)]
    model = _ThinksWhenAsked(small4.tokenizer)
    none, high = compare_reasoning(model, small4, conversations, max_new_tokens=12)
    assert (none.effort, high.effort) == ("none", "high") and none.replies == high.replies == 3
    assert high.prompt_tokens == none.prompt_tokens  # [MODEL_SETTINGS]{"reasoning_effort": …} both ways
    assert (none.with_thinking, high.with_thinking) == (0.0, 1.0)
    words = len(small4.tokenizer("1 plus 2", add_special_tokens=False)["input_ids"])
    assert none.thinking_tokens == 0 and high.thinking_tokens == words
    assert high.reply_tokens == none.reply_tokens + words + 2  # the trace and its two control tokens
    assert none.json_valid == high.json_valid == 1.0 and set(high.answers) == {'{"total": 3}'}


def test_compare_reasoning_refuses_a_model_without_the_switch(processor):
    from course_utils.evaluate import compare_reasoning, supports_reasoning

    assert not supports_reasoning(processor)
    with pytest.raises(ValueError, match="mistral-small-4"):
        compare_reasoning(None, processor, [[{"role": "user", "content": "hi"}]])
