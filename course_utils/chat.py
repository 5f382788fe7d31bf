"""Conversations: the reference encoding (mistral-common), prompts, and generation.

mistral-common is Mistral's own reference implementation of the chat format; the course checks the
Hugging Face chat template against it token for token (see ``tests/test_template_parity.py``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

CONTROL_TOKENS = (
    "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
)  # fmt: skip


@lru_cache(maxsize=4)
def reference_tokenizer(patch_size: int | None = None, max_image_size: int | None = None,
                        spatial_merge_size: int = 2):
    """mistral-common's v7 instruct tokenizer over the real Tekken vocabulary.

    Pass the image settings of a processor (patch size, longest edge, merge size) to encode images
    the way that processor does; leave them out for text-only conversations.
    """
    from mistral_common.protocol.instruct.normalize import get_normalizer
    from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
    from mistral_common.tokens.tokenizers.base import TokenizerVersion
    from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs
    from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV7
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from course_utils.tiny import tekken_path

    tekken = Tekkenizer.from_file(tekken_path())
    image_encoder = None
    if patch_size is not None:
        config = ImageConfig(image_patch_size=patch_size, max_image_size=max_image_size,
                             spatial_merge_size=spatial_merge_size)
        ids = SpecialImageIDs(
            img=tekken.get_special_token("[IMG]"),
            img_break=tekken.get_special_token("[IMG_BREAK]"),
            img_end=tekken.get_special_token("[IMG_END]"),
        )
        image_encoder = ImageEncoder(config, ids)
    return MistralTokenizer(
        InstructTokenizerV7(tekken, image_encoder=image_encoder),
        validator=get_validator(TokenizerVersion.v7, mode=ValidationMode.test),
        request_normalizer=get_normalizer(TokenizerVersion.v7, tekken.model_settings_builder),
    )


def _to_mistral_common_content(content):
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part["type"] == "text":
            parts.append({"type": "text", "text": part["text"]})
        elif part["type"] in ("image", "image_url"):
            image = part.get("image") or part.get("image_url") or part.get("url")
            if isinstance(image, dict):
                image = image.get("url")
            if isinstance(image, str):
                parts.append({"type": "image_url", "image_url": {"url": image}})
            else:
                parts.append({"type": "image", "image": image})
        else:
            raise ValueError(f"unsupported content part type {part['type']!r}")
    return parts


def reference_token_ids(messages: list[dict], processor=None) -> list[int]:
    """Token ids of ``messages`` as mistral-common's v7 tokenizer encodes them.

    A conversation ending with an assistant turn is encoded as a finished (training) example;
    otherwise as a prompt awaiting the reply. With ``processor``, images use its image settings.
    """
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kwargs = {}
    if processor is not None:
        ip = processor.image_processor
        kwargs = dict(
            patch_size=ip.patch_size["height"] if isinstance(ip.patch_size, dict) else ip.patch_size,
            max_image_size=ip.size["longest_edge"],
            spatial_merge_size=processor.spatial_merge_size,
        )
    tok = reference_tokenizer(**kwargs)
    converted = [{"role": m["role"], "content": _to_mistral_common_content(m["content"])} for m in messages]
    request = ChatCompletionRequest(messages=converted)
    if messages and messages[-1]["role"] == "assistant":
        instruct = tok.instruct_tokenizer
        normalized = tok._instruct_request_normalizer.from_chat_completion_request(request)
        return instruct.encode_instruct(normalized).tokens
    return tok.encode_chat_completion(request).tokens


def contains_control_tokens(text: str) -> list[str]:
    """Control-token strings (``[INST]``, ``</s>``, …) typed inside message text.

    The HF tokenizer turns such text into real control tokens (a prompt-injection risk and the one
    place its ids differ from mistral-common, which encodes them as plain text). Validate user data
    with this before training.
    """
    return [t for t in CONTROL_TOKENS if t in text]


def user_message(text: str, images: list | None = None) -> dict:
    """A user turn with optional images first (the layout Mistral's models were trained on)."""
    if not images:
        return {"role": "user", "content": text}
    content = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def prepare_inputs(processor, messages: list[dict], device=None):
    """Apply the chat template (with images) and return model-ready tensors."""
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    if device is not None:
        inputs = inputs.to(device)
    return inputs


def generate(model, processor, messages: list[dict], max_new_tokens: int = 64,
             temperature: float = 0.0, seed: int | None = 0, streamer=None) -> str:
    """Generate one reply. ``temperature=0`` is greedy (deterministic); Mistral recommends 0.15."""
    import torch

    inputs = prepare_inputs(processor, messages, device=model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                                pad_token_id=processor.tokenizer.pad_token_id, **sampling)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return processor.decode(new_tokens, skip_special_tokens=True)


def stream(model, processor, messages: list[dict], max_new_tokens: int = 64,
           temperature: float = 0.0, seed: int | None = 0) -> Iterator[str]:
    """Yield the reply piece by piece as it is generated (a background thread runs ``generate``)."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run():
        try:
            generate(model, processor, messages, max_new_tokens, temperature, seed, streamer=streamer)
        except BaseException as exc:  # surfaced in the caller's thread below
            errors.append(exc)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
