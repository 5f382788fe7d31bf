"""Offline stand-ins: the real Mistral architectures with small random weights.

Backs lesson 00 (building the stand-ins); every lesson on cpu-tiny loads them.

Each stand-in is saved with ``save_pretrained`` so that ``AutoProcessor.from_pretrained(dir)`` and
``AutoModelForImageTextToText.from_pretrained(dir)`` load it exactly as they load the real models:

* ``tiny-mistral-small-3`` — ``Mistral3ForConditionalGeneration``: Pixtral vision tower + Mistral
  GQA text model (the Small 3.1/3.2 architecture).
* ``tiny-mistral-small-4`` — the Small 4 architecture: the same wrapper around a ``mistral4`` text
  model (mixture of experts + multi-head latent attention).

Both use the REAL Tekken tokenizer that ships inside ``mistral-common`` (131072 tokens, the real
special ids) and the v7 chat format, so their token ids match the real models'. Only the weights are
small and random. Same seed → byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from course_utils.paths import staged

STAND_INS = ("tiny-mistral-small-3", "tiny-mistral-small-4")
BUILD_INFO_FILE = "course_stand_in.json"
_BUILD_VERSION = 1  # bump when the recipe below changes, so cached builds are rebuilt

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

    def fingerprint(self) -> str:
        payload = json.dumps(
            {"recipe": self.__dict__, "build": _BUILD_VERSION, "template": CHAT_TEMPLATE}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
    ),
}


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


def build_processor(recipe: StandInRecipe):
    """The processor a real Small 3.x checkpoint ships: Pixtral image processor + Tekken tokenizer."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    image_processor = PixtralImageProcessor(
        patch_size={"height": recipe.patch_size, "width": recipe.patch_size},
        size={"longest_edge": recipe.image_longest_edge},
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=_converted_tokenizer(),
        patch_size=recipe.patch_size,
        spatial_merge_size=recipe.spatial_merge_size,
        chat_template=CHAT_TEMPLATE,
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
    build_processor(recipe).save_pretrained(target)
    info = {
        "name": recipe.name,
        "fingerprint": recipe.fingerprint(),
        "seed": recipe.seed,
        "num_params": num_params,
        "what": (
            "Offline stand-in: real architecture, real Tekken tokenizer and v7 chat format, random weights."
        ),
    }
    (target / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return num_params


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
