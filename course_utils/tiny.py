"""Offline stand-ins: the real Mistral architectures with small random weights.

Backs lesson 00 (building the stand-ins); every lesson on cpu-tiny loads them.

Each stand-in is saved with ``save_pretrained`` so that ``AutoProcessor.from_pretrained(dir)`` and
``AutoModelForImageTextToText.from_pretrained(dir)`` load it exactly as they load the real models:

* ``tiny-mistral-small-3`` — ``Mistral3ForConditionalGeneration``: Pixtral vision tower + Mistral
  GQA text model (the Small 3.1/3.2 architecture).
* ``tiny-mistral-small-4`` — the Small 4 architecture: the same wrapper around a ``mistral4`` text
  model (mixture of experts + multi-head latent attention), and Small 4's own chat format.

Both use the REAL Tekken vocabulary that ships inside ``mistral-common`` (131072 tokens), so their
token ids match the real models'. Small 3 speaks the v7 chat format (``tekken_240911.json`` as
shipped). Small 4 speaks v15 — model settings (``reasoning_effort``), ``[THINK]…[/THINK]`` traces,
``[TOOL_CALLS]name[ARGS]{…}`` — which needs a special-token table the shipped file lacks: the stand-in
gets its own ``tekken.json`` (same vocabulary + that table, see :data:`SMALL_4_SPECIAL_TOKENS`), and
its Hugging Face chat template is generated from that file by mistral-common's template generator.
Only the weights are small and random. Same seed → byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from course_utils.paths import staged

STAND_INS = ("tiny-mistral-small-3", "tiny-mistral-small-4")
BUILD_INFO_FILE = "course_stand_in.json"
_BUILD_VERSION = 4  # bump when the recipe below changes, so cached builds are rebuilt
TEKKEN_FILE = "tekken.json"  # the name Mistral's own repositories (and MistralTokenizer.from_file) use

# The v7 instruct format (Mistral Small 3.1/3.2), written to match mistral-common's
# InstructTokenizerV7 token for token: <s>[SYSTEM_PROMPT]…[/SYSTEM_PROMPT][INST]user[/INST]reply</s>
# No default system prompt is inserted (the Hub's HF-format template inserts one with today's date;
# mistral-common does not — it is the reference). Assistant replies lose trailing spaces, as in
# mistral-common. {% generation %} marks the tokens a response-only loss trains on: reply + </s>.
# The template's long lines are split across Python string pieces (implicit concatenation), so the
# template text itself (and with it the stand-ins' fingerprint) is unchanged.
CHAT_TEMPLATE = (
    r"""{%- macro render(content, where, allow_images) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- set ns = namespace(previous_was_text=false) -%}
        {%- for chunk in content -%}
            {%- if chunk['type'] == 'text' -%}
                {%- if ns.previous_was_text -%}{{- '\n\n' -}}{%- endif -%}
                {{- chunk['text'] -}}
                {%- set ns.previous_was_text = true -%}
            {%- elif allow_images and chunk['type'] in ['image', 'image_url'] -%}
                {{- '[IMG]' -}}
                {%- set ns.previous_was_text = false -%}
            {%- else -%}
                {{- raise_exception('Only text' ~ (' and image' if allow_images else '') """
    r"""~ ' parts are allowed in ' ~ where ~ ' messages, got ' ~ chunk['type']) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set ns_turn = namespace(expect='user') -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if not loop.first -%}
            {{- raise_exception('A system message is only allowed as the first message """
    r"""(found one at position ' ~ loop.index0 ~ ').') -}}
        {%- endif -%}
        {{- '[SYSTEM_PROMPT]' + render(message['content'], 'system', false) + '[/SYSTEM_PROMPT]' -}}
    {%- elif message['role'] in ['user', 'assistant'] -%}
        {%- if message['role'] != ns_turn.expect -%}
            {{- raise_exception('Roles must alternate user/assistant after an optional system message; """
    r"""message ' ~ loop.index0 ~ ' is ' ~ message['role'] ~ ', expected ' ~ ns_turn.expect ~ '.') -}}
        {%- endif -%}
        {%- if message['role'] == 'user' -%}
            {{- '[INST]' + render(message['content'], 'user', true) + '[/INST]' -}}
            {%- set ns_turn.expect = 'assistant' -%}
        {%- else -%}
            {%- generation -%}
                {{- render(message['content'], 'assistant', false).rstrip(' ') + eos_token -}}
            {%- endgeneration -%}
            {%- set ns_turn.expect = 'user' -%}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception('Unknown role ' ~ message['role'] ~ ' at position ' ~ loop.index0 """
    r"""~ '; use system, user or assistant.') -}}
    {%- endif -%}
{%- endfor -%}"""
)

# The same v7 format with tools, tool calls and tool results (lesson 08; data.py renders tool rows with it
# when a model's own template knows no tool calls). Rendered exactly as mistral-common's
# InstructTokenizerV7 encodes tools, calls and results (tests check it token for token). Tools go before
# the *last* user turn; a call's ``arguments`` string is inserted as is, so it must be written as
# ``json.dumps(arguments, ensure_ascii=False)`` (the dataset is). The ``{% generation %}`` markers cover
# what a response-only loss trains on: calls and answers.
TOOLS_CHAT_TEMPLATE = r"""{%- macro render(content, where, allow_images) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is none -%}
    {%- else -%}
        {%- set ns = namespace(previous_was_text=false) -%}
        {%- for chunk in content -%}
            {%- if chunk['type'] == 'text' -%}
                {%- if ns.previous_was_text -%}{{- '\n\n' -}}{%- endif -%}
                {{- chunk['text'] -}}
                {%- set ns.previous_was_text = true -%}
            {%- elif allow_images and chunk['type'] in ['image', 'image_url'] -%}
                {{- '[IMG]' -}}
                {%- set ns.previous_was_text = false -%}
            {%- else -%}
                {{- raise_exception('Only text parts are allowed in ' ~ where ~ ' messages') -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set ns_last = namespace(index=-1) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}{%- set ns_last.index = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- if not loop.first -%}
            {{- raise_exception('A system message is only allowed as the first message.') -}}
        {%- endif -%}
        {{- '[SYSTEM_PROMPT]' + render(message['content'], 'system', false) + '[/SYSTEM_PROMPT]' -}}
    {%- elif message['role'] == 'user' -%}
        {%- if tools and loop.index0 == ns_last.index -%}
            {%- set ns_tools = namespace(items=[]) -%}
            {%- for tool in tools -%}
                {%- set function = tool['function'] if tool['function'] is defined else tool -%}
                {%- set ns_tools.items = ns_tools.items + [{'type': 'function', 'function': {
                    'name': function['name'], 'description': function['description'] or '',
                    'parameters': function['parameters']}}] -%}
            {%- endfor -%}
            {{- '[AVAILABLE_TOOLS]' + ns_tools.items | tojson + '[/AVAILABLE_TOOLS]' -}}
        {%- endif -%}
        {{- '[INST]' + render(message['content'], 'user', true) + '[/INST]' -}}
    {%- elif message['role'] == 'assistant' -%}
        {%- generation -%}
            {{- render(message['content'], 'assistant', false).rstrip(' ') -}}
            {%- if message['tool_calls'] -%}
                {{- '[TOOL_CALLS][' -}}
                {%- for call in message['tool_calls'] -%}
                    {%- set function = call['function'] -%}
                    {{- '{"name": ' + function['name'] | tojson + ', "arguments": ' -}}
                    {{- function['arguments'] if function['arguments'] is string
                        else function['arguments'] | tojson -}}
                    {{- ', "id": ' + call['id'] | tojson + '}' -}}
                    {%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
                {%- endfor -%}
                {{- ']' -}}
            {%- endif -%}
            {{- eos_token -}}
        {%- endgeneration -%}
    {%- elif message['role'] == 'tool' -%}
        {{- '[TOOL_RESULTS]' + message['tool_call_id'] + '[TOOL_CONTENT]' + message['content']
            + '[/TOOL_RESULTS]' -}}
    {%- else -%}
        {{- raise_exception('Unknown role ' ~ message['role'] ~ ' at position ' ~ loop.index0
            ~ '; use system, user, assistant or tool.') -}}
    {%- endif -%}
{%- endfor -%}"""


@dataclass(frozen=True)
class StandInRecipe:
    """Sizes of a stand-in. Small enough to train on 2 CPU cores, real in every other way."""

    name: str
    text: dict
    vision: dict
    image_longest_edge: int = 224  # the real models use 1540; 224 keeps CPU image tokens cheap
    patch_size: int = 14
    spatial_merge_size: int = 2
    seed: int = 0
    chat_format: Literal["v7", "v15"] = "v7"  # v7: Small 3.1/3.2; v15: Small 4 (see SMALL_4_SPECIAL_TOKENS)

    def fingerprint(self) -> str:
        payload = {"recipe": self.__dict__, "build": _BUILD_VERSION, "template": CHAT_TEMPLATE}
        if self.chat_format == "v15":  # the template is generated from this table by mistral-common
            payload["v15"] = {"special": SMALL_4_SPECIAL_TOKENS, "settings": SMALL_4_MODEL_SETTINGS}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,  # llama.cpp's --mmproj export needs at least 3 vision layers
    num_attention_heads=2,
    head_dim=32,
    patch_size=14,
    image_size=224,
)

RECIPES: dict[str, StandInRecipe] = {
    "tiny-mistral-small-3": StandInRecipe(
        name="tiny-mistral-small-3",
        text=dict(
            model_type="mistral",
            vocab_size=131072,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # GQA, as the real 32 q / 8 kv heads
            head_dim=32,
            max_position_embeddings=131072,  # the real 128k context
            # The real RoPE base. Measured on this stand-in (benchmarks/tool_learning.py and cpu_learning.py,
            # same seed): a base of 1e4 instead (32-wide heads keep only ~3 turning frequency pairs at 1e9)
            # takes lesson 08's tool calls from 0 % to 67 % well formed after 300 steps, but lesson 04's
            # receipts then run on in digits (text JSON-valid 0.61-0.71 instead of 1.0); 1e5 and 1e6 do
            # not help the calls. With the real base, 500 steps reach 73 %: the course keeps it.
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000_000.0},
            sliding_window=None,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=11,
        ),
        vision=_VISION,
    ),
    "tiny-mistral-small-4": StandInRecipe(
        name="tiny-mistral-small-4",
        text=dict(
            model_type="mistral4",
            vocab_size=131072,
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_shared_experts=1,
            n_routed_experts=8,  # the real model: 128 routed experts, 4 per token, 1 shared
            num_experts_per_tok=2,
            kv_lora_rank=32,  # MLA: keys/values compressed into a 32-wide latent (real: 256)
            q_lora_rank=64,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=32,
            max_position_embeddings=262144,  # the real 256k context
            # YaRN factor consistent with 256k over an 8k original window (silences the RoPE check)
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 32.0,
                "original_max_position_embeddings": 8192,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "llama_4_scaling_beta": 0.1,
            },
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=11,
        ),
        vision=_VISION,
        seed=1,
        chat_format="v15",
    ),
}

# Small 4's special-token table (tokenizer v15). The shipped tekken_240911.json has none, and
# mistral-common refuses any version above v7 without one ("Special tokens not found"), so the
# stand-in's tekken.json carries the table, built the way mistral-common's own tests build theirs
# (tests/utils/tokenizers.py `get_special_tokens`: the 20 frozen `DEPRECATED_SPECIAL_TOKENS` at
# ranks 0-19, `<SPECIAL_n>` fillers, the named v11+ tokens at fixed ranks, 1000 slots in all).
# The ids are those of the real Small 4 file, not of those tests (which put [THINK]…[/MODEL_SETTINGS]
# at 35-38):
# * jorge-menjivar/tekken-rs tests/test_real_tokenizers.rs and tests/test_v15_real.rs: checks on the real
#   tekken.json of mistralai/Mistral-Small-4-119B-2603 (revision a11f36be, pinned in its
#   scripts/download_test_tokenizers.sh), expected values "produced by mistral-common 1.11.7" on that
#   file (read 2026-11-29): [THINK] 34, [/THINK] 35, [MODEL_SETTINGS] 36, [/MODEL_SETTINGS] 37,
#   1000 special tokens, vocabulary 131072, model-settings builder reasoning_effort in [none, high]
#   (accepts none, default none). The same file checks [ARGS] 32 in Small 3.2's (v11) and Ministral
#   3's (v13) files; [CALL_ID] 33 as in mistral-common's tables (v13+ formats no longer emit it).
# * A public benchmark note reports Small 4's [MODEL_SETTINGS]/[/MODEL_SETTINGS] at 36/37, the only
#   ids where it differs from Ministral 3.
# Ids 0-19 are the frozen table every Tekken file shares (<unk> 0, <s> 1, </s> 2, [INST] 3, [/INST] 4,
# [TOOL_CALLS] 9, [IMG] 10, <pad> 11, …), so text, images and the v7 tags get the same ids in both
# stand-ins.
SMALL_4_SPECIAL_TOKENS: dict[int, str] = {
    32: "[ARGS]",
    33: "[CALL_ID]",
    34: "[THINK]",
    35: "[/THINK]",
    36: "[MODEL_SETTINGS]",
    37: "[/MODEL_SETTINGS]",
}
NUM_SPECIAL_TOKENS = 1000  # as in every released Tekken file (ids 0-999; text tokens start at 1000)
# reasoning_effort as Small 4's tekken.json declares it (same sources as above).
SMALL_4_MODEL_SETTINGS = {
    "reasoning_effort": {"type": "enum", "accepts_none": True, "default": "none", "values": ["none", "high"]}
}
SPECIAL_ID_SOURCES = (
    "https://github.com/jorge-menjivar/tekken-rs/blob/fe1157ca166492e18522bb7224228fe583a99299/"
    "tests/test_real_tokenizers.rs (real Small 4 tekken.json ids; read 2026-11-29)",
    "https://github.com/mistralai/mistral-common/blob/39ec63d5ad82d9be00f265351c9983a94c6fdb2c/"
    "tests/utils/tokenizers.py (how mistral-common's tests build a special-token table; read 2026-11-29)",
    "a public benchmark note: Small 4's [MODEL_SETTINGS]/[/MODEL_SETTINGS] at 36/37",
)


def tekken_path() -> Path:
    """The real Tekken vocabulary file shipped inside the ``mistral-common`` package."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the course needs mistral-common==1.13.1, which ships the Tekken vocabulary. "
            "Reinstall with `pip install -r requirements.txt`."
        )
    return path


@lru_cache(maxsize=1)
def _converted_tokenizer():
    """Tekken → Hugging Face fast tokenizer (about 3 s; done once per process)."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    tok = convert_tekken_tokenizer(str(tekken_path()), chat_template=CHAT_TEMPLATE)
    return tok


def small_4_special_tokens() -> list[dict]:
    """Small 4's 1000-entry special-token table: ranks 0-19 are mistral-common's frozen
    ``DEPRECATED_SPECIAL_TOKENS``, 32-37 :data:`SMALL_4_SPECIAL_TOKENS`, the rest ``<SPECIAL_n>``."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    table = [
        {"rank": int(t["rank"]), "token_str": str(t["token_str"]), "is_control": bool(t["is_control"])}
        for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS
    ]
    for rank in range(len(table), NUM_SPECIAL_TOKENS):
        name = SMALL_4_SPECIAL_TOKENS.get(rank, f"<SPECIAL_{rank}>")
        table.append({"rank": rank, "token_str": name, "is_control": True})
    return table


def write_small_4_tekken(path: str | os.PathLike, recipe: StandInRecipe) -> Path:
    """Write the Small 4 stand-in's ``tekken.json``: the shipped Tekken vocabulary, version v15, the
    special-token table, the recipe's image settings and Small 4's model-settings builder."""
    path = Path(path)
    raw = json.loads(tekken_path().read_text(encoding="utf-8"))
    raw["config"]["version"] = "v15"
    raw["special_tokens"] = small_4_special_tokens()
    raw["image"] = {
        "image_patch_size": recipe.patch_size,
        "max_image_size": recipe.image_longest_edge,  # the real file: 1540
        "spatial_merge_size": recipe.spatial_merge_size,
    }
    raw["model_settings_builder"] = SMALL_4_MODEL_SETTINGS
    keys = ("config", "special_tokens", "model_settings_builder", "image", "vocab")
    ordered = {key: raw[key] for key in keys}
    path.write_text(json.dumps(ordered, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# {% generation %} markers around each assistant turn (reply, [THINK] trace, tool calls and </s>) so
# `return_assistant_tokens_mask` and TRL's assistant-only loss work, as they do with the v7 template.
# They render nothing: the parity tests check the marked template is token-identical to mistral-common.
_ASSISTANT_TURN_START = "    {%- elif message['role'] == 'assistant' %}\n"
_ASSISTANT_BODY_START = "\n        {%- if message['content'] %}\n"
_ASSISTANT_TURN_END = "        {{- eos_token }}\n"


def small_4_chat_template(tekken_file: str | os.PathLike) -> str:
    """The Hugging Face chat template for ``tekken_file``, written by mistral-common's own generator
    (``convert_tokenizer_to_chat_template``: model settings, tools, thinking, images), with
    ``{% generation %}`` markers added around assistant turns."""
    from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template

    template = convert_tokenizer_to_chat_template(tekken_file)
    turn = template.find(_ASSISTANT_TURN_START)
    body = template.find(_ASSISTANT_BODY_START, turn)
    end = template.find(_ASSISTANT_TURN_END, body)
    if min(turn, body, end) < 0 or template.count(_ASSISTANT_TURN_END) != 1:
        import mistral_common

        raise RuntimeError(
            f"mistral-common {mistral_common.__version__} wrote an assistant block this course does not know "
            "(tiny.small_4_chat_template expects mistral-common==1.13.1); reinstall the pinned version."
        )
    end += len(_ASSISTANT_TURN_END)
    body += 1  # keep the newline before the body
    return (
        template[:body]
        + "        {%- generation %}\n"
        + template[body:end]
        + "        {%- endgeneration %}\n"
        + template[end:]
    )


def build_processor(recipe: StandInRecipe, tekken_file: str | os.PathLike | None = None):
    """The processor a real checkpoint ships: Pixtral image processor + Tekken tokenizer + template.

    v7 (Small 3.x) uses the shipped Tekken file and :data:`CHAT_TEMPLATE`; v15 (Small 4) needs the
    stand-in's own ``tekken_file`` (see :func:`write_small_4_tekken`) and its generated template.
    """
    from transformers import PixtralImageProcessor, PixtralProcessor

    if recipe.chat_format == "v15":
        from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

        if tekken_file is None:
            raise ValueError(f"{recipe.name} speaks v15: pass the tekken.json from write_small_4_tekken")
        template = small_4_chat_template(tekken_file)
        tokenizer = convert_tekken_tokenizer(str(tekken_file), chat_template=template)
    else:
        template, tokenizer = CHAT_TEMPLATE, _converted_tokenizer()
    image_processor = PixtralImageProcessor(
        patch_size={"height": recipe.patch_size, "width": recipe.patch_size},
        size={"longest_edge": recipe.image_longest_edge},
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=recipe.patch_size,
        spatial_merge_size=recipe.spatial_merge_size,
        chat_template=template,
    )


def build_config(recipe: StandInRecipe):
    from transformers import AutoConfig, Mistral3Config, PixtralVisionConfig

    text_kwargs = dict(recipe.text)
    text_config = AutoConfig.for_model(text_kwargs.pop("model_type"), **text_kwargs)
    vision_config = PixtralVisionConfig(**recipe.vision)
    config = Mistral3Config(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=10,
        spatial_merge_size=recipe.spatial_merge_size,
        tie_word_embeddings=recipe.text.get("tie_word_embeddings", False),
    )
    config.architectures = ["Mistral3ForConditionalGeneration"]
    return config


def _build_into(recipe: StandInRecipe, target: Path) -> int:
    import torch
    from transformers import GenerationConfig, Mistral3ForConditionalGeneration

    config = build_config(recipe)
    torch.manual_seed(recipe.seed)
    model = Mistral3ForConditionalGeneration(config).to(torch.float32).eval()
    num_params = sum(p.numel() for p in model.parameters())
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=11, do_sample=False, max_new_tokens=256
    )
    model.save_pretrained(target, safe_serialization=True)
    tekken_file = write_small_4_tekken(target / TEKKEN_FILE, recipe) if recipe.chat_format == "v15" else None
    build_processor(recipe, tekken_file).save_pretrained(target)
    info = {
        "name": recipe.name,
        "fingerprint": recipe.fingerprint(),
        "seed": recipe.seed,
        "num_params": num_params,
        "what": (
            "Offline stand-in: real architecture, real Tekken tokenizer and v7 chat format, random weights."
        ),
    }
    if recipe.chat_format == "v15":
        info["what"] = (
            "Offline stand-in: real architecture, real Tekken vocabulary and Small 4's v15 chat format "
            "(tekken.json here), random weights."
        )
        info["chat_format"] = "v15"
        info["special_ids"] = {token: rank for rank, token in sorted(SMALL_4_SPECIAL_TOKENS.items())}
        info["special_id_sources"] = list(SPECIAL_ID_SOURCES)
        (target / "README.md").write_text(_small_4_readme(), encoding="utf-8")
    (target / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return num_params


def _small_4_readme() -> str:
    rows = "\n".join(f"| `{token}` | {rank} |" for rank, token in sorted(SMALL_4_SPECIAL_TOKENS.items()))
    sources = "\n".join(f"- {source}" for source in SPECIAL_ID_SOURCES)
    return f"""# tiny-mistral-small-4 (offline stand-in)

Mistral Small 4's architecture (Mistral3 wrapper, `mistral4` text model: MoE + MLA, Pixtral vision)
with small random weights, built by `course_utils.tiny.build_stand_in("tiny-mistral-small-4")`.

`tekken.json` is Small 4's tokenizer in Mistral's own format (`MistralTokenizer.from_file` loads it
as tokenizer v15): the real Tekken vocabulary shipped in mistral-common, Small 4's special-token
table and its `reasoning_effort` setting (`none` | `high`, default `none`). `tokenizer.json` and
`chat_template.jinja` were converted from it (transformers' `convert_tekken_tokenizer`,
mistral-common's `convert_tokenizer_to_chat_template` + `{{% generation %}}` markers).
`AutoProcessor` loads `tokenizer.json` + `chat_template.jinja`; `AutoTokenizer` finds `tekken.json`
and returns transformers' `MistralCommonBackend` (mistral-common inside), as for Mistral's own
repositories.
Ids 0-19 are the table every Tekken file shares (`<s>` 1, `</s>` 2, `[INST]` 3, `[/INST]` 4,
`[TOOL_RESULTS]` 7, `[TOOL_CALLS]` 9, `[IMG]` 10, `[SYSTEM_PROMPT]` 17, …). Added for v15:

| token | id |
|---|---|
{rows}

Sources:
{sources}

Checked: `tests/test_small4_format.py` renders generated conversations (reasoning effort, thinking,
tools, tool calls and results, images) with this template and with mistral-common's
`encode_chat_completion` on this `tekken.json`: the token ids are identical once the data is written
as mistral-common writes it (`course_utils.chat.normalize_like_mistral_common`: it re-serializes
tool-call arguments, orders tool results by call and drops trailing spaces of plain replies; the
template copies them as given). Known difference, not the template's: for images larger than the
longest edge, transformers' `PixtralProcessor` floors the scaled size where mistral-common rounds
(rare sizes differ by one row of image tokens).
"""


def default_out_dir() -> Path:
    """``outputs/stand-ins`` under the course root (see :mod:`course_utils.paths`)."""
    from course_utils.paths import outputs_dir

    return outputs_dir("stand-ins")


def build_stand_in(
    name: str = "tiny-mistral-small-3", out_dir: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Build (or reuse the cached) stand-in ``name`` under ``out_dir`` and return its directory.

    A cached build is reused only when its recipe fingerprint matches; the new build is written to a
    temporary directory and moved into place, so an interrupted build never leaves a half model.
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown stand-in {name!r}; choose one of {', '.join(RECIPES)}.")
    recipe = RECIPES[name]
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    target = out_dir / name
    info_file = target / BUILD_INFO_FILE
    if not force and info_file.is_file():
        try:
            if json.loads(info_file.read_text()).get("fingerprint") == recipe.fingerprint():
                return target
        except json.JSONDecodeError:
            pass
    with staged(target, overwrite=True, folder=True) as tmp:  # a stale or half-built stand-in is rebuilt
        _build_into(recipe, tmp)
    return target


def build_all(out_dir: str | os.PathLike | None = None, force: bool = False) -> dict[str, Path]:
    return {name: build_stand_in(name, out_dir, force=force) for name in STAND_INS}


def stand_in_info(path: str | os.PathLike) -> dict:
    """The build record of a stand-in directory (name, seed, parameter count, fingerprint)."""
    return json.loads((Path(path) / BUILD_INFO_FILE).read_text())
