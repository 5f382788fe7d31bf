import base64

import pytest
from PIL import Image

from course_utils.chat import (
    JSONExtractionError,
    extract_json,
    generate_batch,
    image_token_cost,
    load_image,
    resize_for_budget,
    to_data_uri,
    user_message,
)
from course_utils.receipts import RECEIPT_SCHEMA


@pytest.mark.parametrize(
    "size", [(300, 150), (150, 300), (224, 224), (1000, 40), (57, 33), (640, 480), (13, 900), (1999, 1201)]
)
def test_image_token_cost_equals_what_the_processor_emits(processor, size):
    out = processor.apply_chat_template(
        [user_message("x", [Image.new("RGB", size)])], tokenize=True, return_dict=True
    )
    ids = out["input_ids"][0].tolist()
    assert ids.count(10) + ids.count(12) + ids.count(13) == image_token_cost(*size, processor=processor)


def test_real_model_image_costs():
    # Small 3.x: patch 14, merge 2 -> one token per 28x28 block, longest edge 1540 (55 blocks)
    assert image_token_cost(1540, 1540) == 55 * 55 + 55
    assert image_token_cost(28, 28) == 2  # one [IMG] + [IMG_END]
    assert image_token_cost(3080, 1540) == image_token_cost(1540, 770)  # scaled down, never up


def test_resize_for_budget_fits_and_never_upscales():
    big = Image.new("RGB", (1200, 1600))
    small = resize_for_budget(big, 300)
    assert image_token_cost(*small.size) <= 300 < image_token_cost(*big.size)
    assert abs(small.size[0] / small.size[1] - 0.75) < 0.02  # aspect ratio kept
    tiny = Image.new("RGB", (50, 50))
    assert resize_for_budget(tiny, 300) is tiny


def test_data_uri_round_trip_is_lossless(tmp_path):
    image = Image.effect_noise((40, 30), 50).convert("RGB")
    uri = to_data_uri(image)
    assert uri.startswith("data:image/png;base64,")
    back = load_image(uri)
    assert back.size == (40, 30) and back.convert("RGB").tobytes() == image.tobytes()
    path = tmp_path / "x.png"
    image.save(path)
    assert load_image(str(path)).convert("RGB").tobytes() == image.tobytes()
    assert base64.b64decode(uri.split(",", 1)[1])[:4] == b"\x89PNG"


def test_bad_image_sources_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="data:image"):
        load_image("data:text/plain;base64,aGk=")
    with pytest.raises(TypeError):
        load_image(42)


GOOD = {
    "merchant": "Café",
    "date": "2024-02-01",
    "currency": "EUR",
    "items": [{"name": "Tea", "qty": 2, "unit_price": 1.5}],
    "subtotal": 3.0,
    "tax": 0.57,
    "total": 3.57,
}


@pytest.mark.parametrize(
    "reply",
    [
        '{"a": 1}',
        'Here you go:\n```json\n{"a": 1}\n```\nAnything else?',
        '```\n{"a": 1}\n```',
        '{"a": 1} -- I hope this helps! {"b": 2}',
    ],
)
def test_extract_json_handles_fences_and_trailing_text(reply):
    assert extract_json(reply) == {"a": 1}


@pytest.mark.parametrize(
    "reply",
    [
        # a chatty model shows code first, then the answer
        'Parse it with:\n```python\nprint(x)\n```\nResult:\n```json\n{"a": 1}\n```',
        '```python\nrow = {1: 2}\n```\n{"a": 1}',
        # the first fence is not JSON, the second is
        '```\nno json here\n```\n```json\n{"a": 1}\n```',
        '```JSON\n{"a": 1}\n```',
    ],
)
def test_extract_json_looks_past_fences_that_hold_no_object(reply):
    assert extract_json(reply) == {"a": 1}


def test_extract_json_does_not_take_an_object_nested_in_broken_json():
    # the outer object is cut off: its inner item is not the reply's answer
    with pytest.raises(JSONExtractionError, match="invalid JSON"):
        extract_json('{"merchant": "Café", "items": [{"name": "Tea", "qty": 2}], "total": 3.5')


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_extract_json_refuses_non_json_numbers(constant):
    with pytest.raises(JSONExtractionError, match=f"{constant}.*not JSON"):
        extract_json(f'{{"total": {constant}}}')


@pytest.mark.parametrize(
    "reply, message",
    [
        ("I cannot read this receipt.", "no JSON object"),
        ('{"merchant": "Café", "total": 3.57,,}', "invalid JSON at character"),
        ("[1, 2]", "no JSON object"),
    ],
)
def test_extract_json_errors_are_clear(reply, message):
    with pytest.raises(JSONExtractionError, match=message):
        extract_json(reply)


def test_schema_errors_name_the_field():
    import json

    assert extract_json(json.dumps(GOOD), RECEIPT_SCHEMA) == GOOD
    bad = dict(GOOD, items=[{"name": "Tea", "qty": "2", "unit_price": 1.5}])
    with pytest.raises(JSONExtractionError, match=r"field items\[0\]\.qty: '2' is not of type 'integer'"):
        extract_json(json.dumps(bad), RECEIPT_SCHEMA)
    with pytest.raises(JSONExtractionError, match="'total' is a required property"):
        extract_json(json.dumps({k: v for k, v in GOOD.items() if k != "total"}), RECEIPT_SCHEMA)


def test_batch_generation_matches_one_at_a_time(stand_in_dir):
    from course_utils.chat import generate
    from course_utils.models import load

    loaded = load("cpu-tiny", stand_in_dir=stand_in_dir)
    side_before = loaded.processor.tokenizer.padding_side
    conversations = [
        [user_message("Total of: tea 2.50")],
        [user_message("A much longer prompt about a receipt " * 3)],
        [user_message("Read it", [Image.new("RGB", (90, 60), "white")])],
    ]
    batched = generate_batch(
        loaded.model, loaded.processor, conversations, max_new_tokens=6, batch_size=3, progress=False
    )
    single = [generate(loaded.model, loaded.processor, c, max_new_tokens=6) for c in conversations]
    assert batched == single
    assert loaded.processor.tokenizer.padding_side == side_before  # restored after the call


def test_extract_json_keeps_fences_written_inside_a_json_string():
    reply = '{"note": "use ```{\\"a\\": 1}``` here", "total": 3}'
    assert extract_json(reply) == {"note": 'use ```{"a": 1}``` here', "total": 3}


def test_extract_json_refuses_a_number_too_large_for_a_float():
    with pytest.raises(JSONExtractionError, match="not JSON"):
        extract_json('{"total": 1e999}')
