"""Small 4's chat format (tokenizer v15) on its stand-in, token for token against mistral-common.

The stand-in's Hugging Face template — generated from its ``tekken.json`` by mistral-common — must
encode reasoning effort (unset, "none", "high"), ``reasoning_content`` and thinking parts, tool
definitions, tool calls, tool results and images exactly as ``MistralTokenizer.encode_chat_completion``
does on that same file — once the data is written the way mistral-common writes it
(``normalize_like_mistral_common``; the tests below show each rule it applies).
"""

import json
import string
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from course_utils.chat import (
    CONTROL_TOKENS_V15,
    canonical_arguments,
    contains_control_tokens,
    normalize_like_mistral_common,
    reference_token_ids,
)
from course_utils.tiny import SMALL_4_SPECIAL_TOKENS, TEKKEN_FILE, small_4_special_tokens

# Every special-token string of the stand-in (the HF tokenizer turns typed ones into control tokens,
# mistral-common keeps them as text — the v7 tests show that difference; here they are left out).
SPECIAL_STRINGS = tuple(entry["token_str"] for entry in small_4_special_tokens())
MIN_EXAMPLES = 150


@pytest.fixture(scope="module")
def small4_dir(stand_in_dir):
    return stand_in_dir / "tiny-mistral-small-4"


@pytest.fixture(scope="module")
def small4(small4_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(small4_dir)


def hf_ids(processor, messages, **kwargs):
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    ids = out["input_ids"]
    ids = ids.tolist() if hasattr(ids, "tolist") else ids
    return (ids[0] if ids and isinstance(ids[0], list) else ids), out


# --- The stand-in's files -------------------------------------------------------------------------


def test_tekken_json_loads_in_mistral_common_as_v15_with_small_4_ids(small4_dir):
    from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV15
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = MistralTokenizer.from_file(str(small4_dir / TEKKEN_FILE))
    assert isinstance(tok.instruct_tokenizer, InstructTokenizerV15)
    tekken = tok.instruct_tokenizer.tokenizer
    assert tekken.n_words == 131072 and tekken.num_special_tokens == 1000
    named = {
        "<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "[AVAILABLE_TOOLS]": 5,
        "[/AVAILABLE_TOOLS]": 6, "[TOOL_RESULTS]": 7, "[/TOOL_RESULTS]": 8, "[TOOL_CALLS]": 9, "[IMG]": 10,
        "<pad>": 11, "[IMG_BREAK]": 12, "[IMG_END]": 13, "[SYSTEM_PROMPT]": 17, "[/SYSTEM_PROMPT]": 18,
        "[ARGS]": 32, "[THINK]": 34, "[/THINK]": 35, "[MODEL_SETTINGS]": 36, "[/MODEL_SETTINGS]": 37,
    }  # fmt: skip
    assert {token: tekken.get_special_token(token) for token in named} == named
    effort = tekken.model_settings_builder.reasoning_effort
    assert [str(v) for v in effort.values] == ["none", "high"] and str(effort.default) == "none"
    # The real Small 4 file's ids for these strings, as mistral-common 1.11.7 produced them
    # (jorge-menjivar/tekken-rs tests/test_v15_real.rs): same vocabulary, same ids.
    assert tekken.encode("Hello, world!", bos=True, eos=False) == [1, 22177, 1044, 4304, 1033]
    assert tekken.encode("función común días 日本語 🎉", bos=True, eos=False) == [
        1, 12127, 1963, 35239, 20608, 30367, 15199, 119685, 1142, 1137,
    ]  # fmt: skip


def test_hf_processor_uses_the_v15_vocabulary_and_the_generated_template(small4, small4_dir):
    from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template

    tokenizer = small4.tokenizer
    assert type(small4).__name__ == "PixtralProcessor" and len(tokenizer) == 131072
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in SMALL_4_SPECIAL_TOKENS.values()} == {
        t: rank for rank, t in SMALL_4_SPECIAL_TOKENS.items()
    }
    generated = convert_tokenizer_to_chat_template(small4_dir / TEKKEN_FILE)
    marked = small4.chat_template
    assert marked.count("{%- generation %}") == 1 and marked.count("{%- endgeneration %}") == 1
    unmarked = marked.replace("        {%- generation %}\n", "").replace("        {%- endgeneration %}\n", "")
    assert unmarked == generated  # mistral-common's template, plus the two markers only
    assert (small4_dir / "chat_template.jinja").read_text() == marked


def test_small_3_keeps_the_v7_format(stand_in_dir):
    from transformers import AutoProcessor

    small3 = AutoProcessor.from_pretrained(stand_in_dir / "tiny-mistral-small-3")
    assert not (stand_in_dir / "tiny-mistral-small-3" / TEKKEN_FILE).exists()
    assert small3.tokenizer.convert_tokens_to_ids("[THINK]") == small3.tokenizer.unk_token_id
    text = small3.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == "<s>[INST]Hi[/INST]"


def test_readme_and_build_record_state_the_ids_and_sources(small4_dir):
    info = json.loads((small4_dir / "course_stand_in.json").read_text())
    assert info["chat_format"] == "v15"
    assert info["special_ids"] == {token: rank for rank, token in SMALL_4_SPECIAL_TOKENS.items()}
    assert any("tekken-rs" in s for s in info["special_id_sources"])
    readme = (small4_dir / "README.md").read_text()
    for rank, token in SMALL_4_SPECIAL_TOKENS.items():
        assert f"| `{token}` | {rank} |" in readme


def test_the_format_renders_settings_thinking_and_tool_calls_where_mistral_places_them(small4):
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "Q"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "T",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        },
        {"role": "tool", "content": "R"},
        {"role": "assistant", "content": "A"},
    ]
    text = small4.apply_chat_template(messages, tools=tools, reasoning_effort="high", tokenize=False)
    assert text == (
        '<s>[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "f", "description": "d", '
        '"parameters": {}}}][/AVAILABLE_TOOLS][MODEL_SETTINGS]{"reasoning_effort": "high"}[/MODEL_SETTINGS]'
        '[INST]Q[/INST][THINK]T[/THINK][TOOL_CALLS]f[ARGS]{"a": 1}</s>[TOOL_RESULTS]R[/TOOL_RESULTS]A</s>'
    )


def test_assistant_mask_covers_thinking_tool_calls_replies_and_eos(small4):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "T1"},
        {"role": "user", "content": "Q2"},
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "R"},
        {"role": "assistant", "content": "A2"},
    ]
    ids, out = hf_ids(small4, messages, return_assistant_tokens_mask=True)
    mask = out["assistant_masks"]
    mask = mask[0] if isinstance(mask[0], list) else mask
    trained = small4.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "[THINK]T1[/THINK]A1</s>[TOOL_CALLS]f[ARGS]{}</s>A2</s>"


def test_unknown_reasoning_effort_is_refused_by_both(small4, small4_dir):
    from jinja2.exceptions import TemplateError

    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(TemplateError, match='reasoning_effort must be either "none" or "high"'):
        small4.apply_chat_template(messages, reasoning_effort="medium", tokenize=False)
    with pytest.raises(
        ValueError, match="reasoning_effort='medium' is not accepted .* use one of none, high"
    ):
        reference_token_ids(messages, tekken_file=small4_dir / TEKKEN_FILE, reasoning_effort="medium")


def test_reference_helper_errors_are_one_clear_line(small4_dir, tmp_path):
    from types import SimpleNamespace

    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="pass tekken_file="):
        reference_token_ids(hi, reasoning_effort="high")
    with pytest.raises(FileNotFoundError, match="tekken.json not found"):
        reference_token_ids(hi, tekken_file=tmp_path / TEKKEN_FILE)
    other_sizes = SimpleNamespace(
        image_processor=SimpleNamespace(patch_size={"height": 16}, size={"longest_edge": 1024}),
        spatial_merge_size=1,
    )
    with pytest.raises(ValueError, match="image settings .* differ from the processor's"):
        reference_token_ids(hi, other_sizes, tekken_file=small4_dir / TEKKEN_FILE)


def test_tool_calls_are_spelled_and_results_ordered_as_mistral_common_encodes_them(small4, small4_dir):
    def call(id_, arguments):
        return {"id": id_, "type": "function", "function": {"name": "f", "arguments": arguments}}

    messages = [
        {"role": "user", "content": "Q"},
        {
            "role": "assistant",
            "tool_calls": [call("aaaaaaaaa", '{"q":"caf\\u00e9"}'), call("bbbbbbbbb", "{}")],
        },
        {"role": "tool", "tool_call_id": "bbbbbbbbb", "content": "[1,2]"},
        {"role": "tool", "tool_call_id": "aaaaaaaaa", "content": "sunny"},
    ]
    reference = reference_token_ids(messages, tekken_file=small4_dir / TEKKEN_FILE)
    # The template copies arguments and results as given; mistral-common re-serializes the arguments
    # and orders the results by call: different tokens...
    assert hf_ids(small4, messages)[0] != reference
    # ...until the data is written the way mistral-common writes it.
    normalized = normalize_like_mistral_common(messages)
    assert normalized[1]["tool_calls"][0]["function"]["arguments"] == '{"q": "café"}'
    assert [m["content"] for m in normalized[2:]] == ["sunny", "[1,2]"]  # results are kept verbatim
    assert messages[2]["content"] == "[1,2]"  # the input is untouched
    assert hf_ids(small4, normalized)[0] == reference


@pytest.mark.parametrize(
    "content, extra, stripped",
    [
        ("a  ", {}, True),
        ([{"type": "text", "text": "a "}, {"type": "text", "text": "b  "}], {}, True),
        ("a  ", {"reasoning_content": "t"}, False),
        ([{"type": "thinking", "thinking": "t"}, {"type": "text", "text": "a  "}], {}, False),
    ],
)
def test_trailing_spaces_of_plain_replies_are_dropped_as_mistral_common_does(
    small4, small4_dir, content, extra, stripped
):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": content, **extra}]
    reference = reference_token_ids(messages, tekken_file=small4_dir / TEKKEN_FILE)
    assert (hf_ids(small4, messages)[0] == reference) is not stripped
    assert hf_ids(small4, normalize_like_mistral_common(messages))[0] == reference


@pytest.mark.parametrize(
    "arguments, expected",
    [('{"a":1}', '{"a": 1}'), (" [1,2] ", "[1, 2]"), ("sunny", '"sunny"'), ("", "{}"), (None, "{}")],
)
def test_canonical_arguments(arguments, expected):
    assert canonical_arguments(arguments) == expected


def test_typed_v15_control_tokens_are_detected():
    assert contains_control_tokens("a [THINK] b", CONTROL_TOKENS_V15) == ["[THINK]"]
    assert contains_control_tokens("a [THINK] b") == []  # not a v7 control token
    assert set(SMALL_4_SPECIAL_TOKENS.values()) <= set(CONTROL_TOKENS_V15)


# --- Generated conversations ------------------------------------------------------------------------

typed_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cs", "Co", "Cn")),
        st.sampled_from([" ", "\n", "\t", "{", "}", '"', ":", "[", "]", "/", "é", "ß", "你", "🙂"]),
    ),
    min_size=1,
    max_size=30,
).filter(lambda s: not any(token in s for token in SPECIAL_STRINGS))
identifier = st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=12)
call_id = st.text(alphabet=string.ascii_letters + string.digits, min_size=9, max_size=9)
# mistral-common needs a non-empty reply once trailing spaces are stripped
reply_text = typed_text.filter(lambda s: s.rstrip(" ") != "")
json_value = st.one_of(st.integers(-1000, 1000), st.booleans(), st.none(), typed_text)


@st.composite
def json_text(draw):
    """JSON as different producers spell it: compact or spaced, with or without \\u escapes."""
    value = draw(st.one_of(json_value, st.dictionaries(identifier, json_value, max_size=3)))
    separators = draw(st.sampled_from([None, (",", ":"), (", ", ": ")]))
    return json.dumps(value, ensure_ascii=draw(st.booleans()), separators=separators)


@st.composite
def tool_definition(draw):
    properties = draw(st.dictionaries(identifier, st.just({"type": "string"}), max_size=3))
    return {
        "type": "function",
        "function": {
            "name": draw(identifier),
            "description": draw(typed_text),
            "parameters": {"type": "object", "properties": properties, "required": sorted(properties)},
        },
    }


@st.composite
def image(draw):
    # Up to the stand-in's longest edge (224): larger images are scaled down, where PixtralProcessor
    # floors (and can reach 0 px) while mistral-common rounds — an image-processor difference, not
    # the template's (see the README's known mismatches); test_template_parity covers the v7 sizes.
    size = (draw(st.integers(1, 224)), draw(st.integers(1, 224)))
    return Image.new("RGB", size, draw(st.sampled_from(["white", "black", "red", (12, 200, 99)])))


@st.composite
def user_turn(draw, seen):
    if not draw(st.booleans()):
        return {"role": "user", "content": draw(typed_text)}
    parts = [{"type": "text", "text": draw(typed_text)} for _ in range(draw(st.integers(0, 2)))]
    images = [{"type": "image", "image": draw(image())} for _ in range(draw(st.integers(0, 2)))]
    parts = draw(st.permutations(parts + images)) if parts + images else [{"type": "text", "text": "x"}]
    if images:
        seen["image"] += 1
    return {"role": "user", "content": list(parts)}


@st.composite
def assistant_reply(draw, seen):
    kind = draw(st.sampled_from(["text", "reasoning_content", "thinking"]))
    seen[kind] += 1
    text = draw(reply_text)
    if kind == "reasoning_content":
        return {"role": "assistant", "content": text, "reasoning_content": draw(typed_text)}
    if kind == "thinking":
        thinking = {"type": "thinking", "thinking": draw(typed_text)}
        return {"role": "assistant", "content": [thinking, {"type": "text", "text": text}]}
    return {"role": "assistant", "content": text}


@st.composite
def tool_round(draw, tools, seen):
    """An assistant turn of tool calls (arguments as a dict, JSON in any spelling, or plain text),
    then one tool result per call."""
    calls = []
    called = draw(st.lists(st.sampled_from(tools), min_size=1, max_size=2))
    ids = draw(st.lists(call_id, min_size=len(called), max_size=len(called), unique=True))
    for tool, id_ in zip(called, ids):
        arguments = draw(
            st.one_of(st.dictionaries(identifier, json_value, max_size=3), json_text(), typed_text)
        )
        function = {"name": tool["function"]["name"], "arguments": arguments}
        calls.append({"id": id_, "type": "function", "function": function})
    seen["tool_call"] += 1
    reasoning = {"reasoning_content": draw(typed_text)} if draw(st.booleans()) else {}
    turn = [{"role": "assistant", "content": None, "tool_calls": calls, **reasoning}]
    for call in draw(st.permutations(calls)):  # in any order: normalize_like_mistral_common sorts them
        result = draw(st.one_of(typed_text, json_text()))  # kept verbatim by both
        turn.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        seen["tool_result"] += 1
    return turn


@st.composite
def small4_conversations(draw, seen):
    effort = draw(st.sampled_from(["unset", "none", "high"]))
    seen[f"effort {effort}"] += 1
    tools = draw(st.one_of(st.none(), st.lists(tool_definition(), min_size=1, max_size=2)))
    if tools:
        seen["tools"] += 1
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(typed_text)})
    turns = draw(st.integers(1, 3))
    for i in range(turns):
        messages.append(draw(user_turn(seen)))
        if i == turns - 1 and draw(st.booleans()):
            break  # a prompt awaiting the reply
        if tools and draw(st.booleans()):
            messages.extend(draw(tool_round(tools, seen)))
            if i == turns - 1 and draw(st.booleans()):
                break  # awaiting the answer to the tool results
        messages.append(draw(assistant_reply(seen)))
    seen["training example" if messages[-1]["role"] == "assistant" else "prompt"] += 1
    kwargs = {} if effort == "unset" else {"reasoning_effort": effort}
    if tools:
        kwargs["tools"] = tools
    return messages, kwargs


def test_generated_conversations_match_mistral_common(small4, small4_dir):
    seen = Counter()
    tekken_file = small4_dir / TEKKEN_FILE

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def check(data):
        messages, kwargs = data.draw(small4_conversations(seen))
        ids, _ = hf_ids(small4, normalize_like_mistral_common(messages), **kwargs)
        assert ids == reference_token_ids(messages, small4, tekken_file=tekken_file, **kwargs)
        seen["examples"] += 1

    check()
    assert seen["examples"] >= MIN_EXAMPLES
    features = (
        "effort unset", "effort none", "effort high", "tools", "tool_call", "tool_result",
        "reasoning_content", "thinking", "image", "training example", "prompt",
    )  # fmt: skip
    assert {f: seen[f] for f in features if seen[f] < 5} == {}, seen


@pytest.mark.parametrize("size", [(300, 150), (150, 300), (224, 224), (57, 33), (640, 480)])
def test_image_rows_match_mistral_common(small4, small4_dir, size):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Read it."},
                {"type": "image", "image": Image.new("RGB", size)},
            ],
        }
    ]
    ids, out = hf_ids(small4, messages, reasoning_effort="high")
    assert ids == reference_token_ids(
        messages, small4, tekken_file=small4_dir / TEKKEN_FILE, reasoning_effort="high"
    )
    height, width = (int(v) for v in out["image_sizes"][0])
    rows, cols = height // 28, width // 28
    assert ids.count(10) == rows * cols and ids.count(12) == rows - 1 and ids.count(13) == 1
    assert ids[ids.index(3) + 1] == 10  # text then one image: the image goes first, as in mistral-common
