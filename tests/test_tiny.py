import hashlib
import json

import pytest

from course_utils import tiny
from course_utils.profiles import stand_in_spec
from course_utils.tiny import BUILD_INFO_FILE, RECIPES, TEKKEN_FILE, build_stand_in, stand_in_info


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_auto_classes_load_both_stand_ins_like_real_checkpoints(stand_in_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    for name in RECIPES:
        processor = AutoProcessor.from_pretrained(stand_in_dir / name)
        model = AutoModelForImageTextToText.from_pretrained(stand_in_dir / name)
        assert type(model).__name__ == "Mistral3ForConditionalGeneration"
        assert type(processor).__name__ == "PixtralProcessor"
        assert len(processor.tokenizer) == 131072 == model.config.text_config.vocab_size
        # the real special ids
        ids = processor.tokenizer.convert_tokens_to_ids(
            [
                "<unk>",
                "<s>",
                "</s>",
                "[INST]",
                "[/INST]",
                "[IMG]",
                "<pad>",
                "[IMG_BREAK]",
                "[IMG_END]",
                "[SYSTEM_PROMPT]",
                "[/SYSTEM_PROMPT]",
            ]
        )
        assert ids == [0, 1, 2, 3, 4, 10, 11, 12, 13, 17, 18]
        assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 11
        assert "{% generation" in processor.chat_template or "{%- generation" in processor.chat_template


def test_small_3_is_gqa_and_small_4_is_moe_with_mla(stand_in_dir):
    from transformers import AutoConfig

    c3 = AutoConfig.from_pretrained(stand_in_dir / "tiny-mistral-small-3")
    c4 = AutoConfig.from_pretrained(stand_in_dir / "tiny-mistral-small-4")
    assert c3.text_config.model_type == "mistral" and c4.text_config.model_type == "mistral4"
    assert c3.text_config.num_attention_heads > c3.text_config.num_key_value_heads  # GQA
    assert (
        c4.text_config.kv_lora_rank and c4.text_config.n_routed_experts > c4.text_config.num_experts_per_tok
    )
    assert c3.vision_config.model_type == "pixtral" and c3.vision_config.num_hidden_layers >= 3
    spec = stand_in_spec(
        "tiny-mistral-small-4", c4, stand_in_info(stand_in_dir / "tiny-mistral-small-4")["num_params"]
    )
    assert spec.attention == "MLA" and spec.context_length == 262144
    assert spec.kv_cache_bytes_per_token() == c4.text_config.num_hidden_layers * (32 + 16) * 2


def test_same_seed_gives_byte_identical_weights(stand_in_dir, tmp_path):
    rebuilt = build_stand_in("tiny-mistral-small-3", tmp_path)
    for f in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert sha256(rebuilt / f) == sha256(stand_in_dir / "tiny-mistral-small-3" / f), f
    # different seeds -> different weights
    assert sha256(stand_in_dir / "tiny-mistral-small-4" / "model.safetensors") != sha256(
        rebuilt / "model.safetensors"
    )


def test_small_4_rebuilds_byte_identical_with_its_own_tekken_json(stand_in_dir, tmp_path):
    rebuilt = build_stand_in("tiny-mistral-small-4", tmp_path)
    files = ("model.safetensors", TEKKEN_FILE, "tokenizer.json", "chat_template.jinja", "README.md")
    for f in files:
        assert sha256(rebuilt / f) == sha256(stand_in_dir / "tiny-mistral-small-4" / f), f
    # the same Tekken vocabulary as Small 3 (and the shipped file): only the special-token table differs
    small3 = json.loads((stand_in_dir / "tiny-mistral-small-3" / "tokenizer.json").read_text())["model"]
    small4 = json.loads((rebuilt / "tokenizer.json").read_text())["model"]
    renamed = {token: rank for rank, token in tiny.SMALL_4_SPECIAL_TOKENS.items()}
    kept = {token: rank for token, rank in small3["vocab"].items() if rank not in tiny.SMALL_4_SPECIAL_TOKENS}
    assert kept | renamed == small4["vocab"]
    assert small3["merges"] == small4["merges"]


def test_the_fingerprint_follows_small_4_special_table(monkeypatch):
    small3, small4 = (RECIPES[n].fingerprint() for n in tiny.STAND_INS)
    monkeypatch.setitem(tiny.SMALL_4_SPECIAL_TOKENS, 36, "[SETTINGS]")
    assert RECIPES["tiny-mistral-small-4"].fingerprint() != small4  # a cached build would be rebuilt
    assert RECIPES["tiny-mistral-small-3"].fingerprint() == small3


def test_cached_build_is_reused_and_a_stale_one_rebuilt(tmp_path):
    path = build_stand_in("tiny-mistral-small-3", tmp_path)
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_stand_in("tiny-mistral-small-3", tmp_path) == path
    assert weights.stat().st_mtime_ns == mtime  # reused, not rebuilt
    info = json.loads((path / BUILD_INFO_FILE).read_text())
    info["fingerprint"] = "stale"
    (path / BUILD_INFO_FILE).write_text(json.dumps(info))
    build_stand_in("tiny-mistral-small-3", tmp_path)
    assert stand_in_info(path)["fingerprint"] == RECIPES["tiny-mistral-small-3"].fingerprint()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_unknown_stand_in_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tiny-mistral-small-3, tiny-mistral-small-4"):
        build_stand_in("tiny-mistral-large", tmp_path)
