"""Lesson 06: merge → GGUF → quantize → verify against transformers → Modelfile, all offline."""

import json
import re

import pytest
import torch

from course_utils import export, gguf_export, gguf_verify, llama_server, ollama
from course_utils.receipts import SYSTEM_PROMPT

# an exception inside llama.cpp's log callback (strict UTF-8 decoding of a line cut mid-character) is a
# bug here, not a warning
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

CONVERSATIONS = [
    [{"role": "user", "content": "Héllo wörld ✓"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " two  spaces \n"},
        {"role": "assistant", "content": "ok "},
        {"role": "user", "content": "again\ttab"},
    ],
    [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Extract: Café Nord 2 × tea 1,50 € — 3,00 €"},
    ],
    [
        {"role": "user", "content": "日本語のレシート: ¥1,200"},
        {"role": "assistant", "content": '{"total": 1200}'},
        {"role": "user", "content": "and the date?"},
    ],
]


# --- Template pieces and the Modelfile (no llama.cpp needed) ----------------------------------------


def test_template_parts_rebuild_the_training_template(processor):
    parts = ollama.template_parts(processor)
    assert (parts.bos, parts.user_prefix, parts.user_suffix, parts.assistant_suffix) == (
        "<s>",
        "[INST]",
        "[/INST]",
        "</s>",
    )
    for conversation in CONVERSATIONS:
        assert parts.render(conversation) == processor.apply_chat_template(
            gguf_verify.as_parts(conversation), tokenize=False
        )


def test_modelfile_fields_and_stop_tokens(processor):
    parts = ollama.template_parts(processor)
    text = ollama.modelfile(
        "receipts-Q4_K_M.gguf",
        parts,
        system=SYSTEM_PROMPT,
        num_ctx=4096,
        projector="receipts-mmproj-f16.gguf",
    )
    froms = re.findall(r"^FROM (.+)$", text, re.M)
    assert froms == ["./receipts-Q4_K_M.gguf", "./receipts-mmproj-f16.gguf"]
    assert re.findall(r'^PARAMETER stop "(.+)"$', text, re.M) == ["</s>", "[INST]"]
    assert "PARAMETER temperature 0.15" in text and "PARAMETER num_ctx 4096" in text
    assert "PARAMETER repeat_penalty 1.0" in text  # Ollama's default 1.1 is not what was evaluated
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    # the Go template holds exactly the pieces derived from the training template
    system = re.search(r'eq \.Role "system" }}(.*?){{ \.Content }}(.*?)\n', template)
    user = re.search(r'eq \.Role "user" }}(.*?){{ \.Content }}(.*?)\n', template)
    assistant = re.search(r'eq \.Role "assistant" }}{{ \.Content }}(.*?)\n', template)
    assert template.startswith(parts.bos + "{{- range")
    # for a GGUF whose tokenizer adds BOS itself, a literal <s> would double it
    no_bos = ollama.modelfile("m.gguf", parts, bos_in_template=False)
    assert re.search(r'TEMPLATE """(.*?)"""', no_bos, re.S).group(1).startswith("{{- range")
    assert system.groups() == (parts.system_prefix, parts.system_suffix)
    assert user.groups() == (parts.user_prefix, parts.user_suffix)
    assert assistant.group(1) == parts.assistant_suffix
    assert "FROM ./receipts-mmproj" not in ollama.modelfile("m.gguf", parts)


def test_ollama_commands_are_argument_lists():
    cmds = ollama.ollama_commands("receipts; rm -rf /", "outputs/x/Modelfile")
    assert cmds["create"] == ["ollama", "create", "receipts; rm -rf /", "-f", "outputs/x/Modelfile"]
    assert cmds["run"][:3] == ["ollama", "run", "receipts; rm -rf /"]


def test_serving_template_turns_images_into_urls_and_keeps_bos():

    from course_utils.tiny import CHAT_TEMPLATE

    template = llama_server.serving_template(CHAT_TEMPLATE)
    assert "generation" not in template
    assert _served_image_prompt(template) == "<s>[INST]data:image/png;base64,AAAWhat is this?[/INST]"


def _served_image_prompt(template: str) -> str:
    """``template`` rendered as llama-cpp-python's multimodal handler renders it, for one image + text."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}]
    return (
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        .from_string(template)
        .render(messages=messages)
    )


def test_serving_template_uses_the_templates_own_loop_variable(stand_in_dir):
    """Small 4's template (mistral-common's generator) calls a content part ``block``, not ``chunk``: the
    served template must name what its loop names, or every request fails ('chunk' is undefined)."""

    own = (stand_in_dir / "tiny-mistral-small-4" / "chat_template.jinja").read_text()
    text = _served_image_prompt(llama_server.serving_template(own))
    assert text.startswith("<s>") and "[INST]data:image/png;base64,AAAWhat is this?[/INST]" in text


# --- Refusals: disk, existing targets; manifest ------------------------------------------------------


def test_disk_preflight_refuses_with_how_much(tmp_path):
    plan = export.plan_export(24_000_000_000, ("F16", "Q4_K_M"))
    assert plan.files["merged safetensors"] == 48_000_000_000
    assert plan.files["GGUF Q4_K_M"] == int(24e9 * 4.9 / 8)
    with pytest.raises(export.DiskSpaceError, match=r"needs about 1\d\d\.\d\d GiB.*10\.00 GiB is free"):
        export.disk_preflight(tmp_path / "exports", plan.total_bytes, free_bytes=10 * 2**30)
    assert export.disk_preflight(tmp_path, 1000, free_bytes=2000) == 2000


def test_merge_refuses_on_full_disk_before_writing(stand_in_dir, tmp_path):
    from course_utils.models import load

    loaded = load("cpu-tiny", stand_in_dir=stand_in_dir)
    with pytest.raises(export.DiskSpaceError, match="not enough disk"):
        export.merge_adapter(
            loaded.model,
            loaded.processor,
            tmp_path / "no-adapter-needed",
            tmp_path / "merged",
            free_bytes=1024,
        )
    assert not (tmp_path / "merged").exists()


def test_existing_targets_are_never_replaced(tmp_path):
    target = tmp_path / "model-Q4_K_M.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gguf_export.quantize(tmp_path / "src.gguf", target, "Q4_K_M")
    with pytest.raises(FileExistsError):
        gguf_export.convert_to_gguf(tmp_path, target, tools=tmp_path)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        export.merge_adapter(None, None, tmp_path, tmp_path / "merged")
    assert target.read_bytes() == b"precious"
    with pytest.raises(ValueError, match="Q4_K_M"):
        gguf_export.quantize(tmp_path / "src.gguf", tmp_path / "x.gguf", "Q3_XS")


# --- Merge: the adapter must belong to the model it is merged into -----------------------------------


def _q_proj_adapter(base_dir, folder, rename=None):
    """A LoRA on the stand-in's language-model q_proj with non-zero lora_B, saved to ``folder``;
    ``rename(key)`` then rewrites the saved tensor names (an adapter trained for another model)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(folder)
    if rename is not None:
        weights = load_file(folder / "adapter_model.safetensors")
        save_file({rename(k): v for k, v in weights.items()}, folder / "adapter_model.safetensors")
    return folder


def _fresh_stand_in(base_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(base_dir)


def _nothing_written(tmp_path, name="merged"):
    return not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}.*"))


@pytest.mark.parametrize("which", ["all", "one layer"])
def test_merge_refuses_an_adapter_whose_tensors_do_not_load(stand_in_dir, tmp_path, which):
    """peft only warns about adapter tensors it cannot place: the merge then saves the unchanged base as
    the tuned model. Tensors named for another model's layout must stop the export instead."""
    base_dir = stand_in_dir / "tiny-mistral-small-3"
    if which == "all":
        rename = lambda k: k.replace("language_model.", "text_model.")  # noqa: E731
    else:
        rename = lambda k: k.replace("layers.0.", "layers.7.")  # noqa: E731 - a layer the model lacks
    adapter = _q_proj_adapter(base_dir, tmp_path / "adapter", rename)
    model, processor = _fresh_stand_in(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(export.ExportError) as refused:
        export.merge_adapter(model, processor, adapter, tmp_path / "merged")
    message = str(refused.value)
    n_bad = 4 if which == "all" else 2  # lora_A + lora_B per q_proj (the stand-in has 2 layers)
    assert str(adapter) in message and f"{n_bad} of 4 adapter tensors" in message
    assert ("text_model" if which == "all" else "layers.7.") in message  # the first names
    assert "another model" in message
    assert _nothing_written(tmp_path)
    # the caller's model is handed back as it was: no LoRA layers left in it, weights unchanged
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_merge_refuses_an_adapter_trained_on_another_base(stand_in_dir, tmp_path):
    base_dir = stand_in_dir / "tiny-mistral-small-3"
    adapter = _q_proj_adapter(base_dir, tmp_path / "adapter")
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    config["base_model_name_or_path"] = "mistralai/Ministral-3-8B-Instruct-2512"
    config_file.write_text(json.dumps(config))
    model, processor = _fresh_stand_in(base_dir)
    with pytest.raises(export.ExportError, match=r"Ministral-3-8B.*allow_other_base=True") as refused:
        export.merge_adapter(model, processor, adapter, tmp_path / "merged")
    assert str(adapter) in str(refused.value) and str(base_dir) in str(refused.value)
    assert _nothing_written(tmp_path)
    # the caller says it is the same weights: merged, and the merge changed the model
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    base_q = model.state_dict()[q_proj].clone()
    merged = export.merge_adapter(model, processor, adapter, tmp_path / "merged", allow_other_base=True)
    merged_q = _fresh_stand_in(merged)[0].state_dict()[q_proj]
    assert not torch.allclose(merged_q, base_q)


def test_the_course_s_own_base_names_count_as_the_same_model(stand_in_dir, tmp_path, monkeypatch):
    """What a course adapter records as its base and what lessons 06/07 merge it into differ in
    spelling, not in weights: a relative path, a moved or rebuilt stand-in folder, Unsloth's 4-bit
    upload against the 16-bit release. Those pass; another model does not."""
    same = export.same_base_model
    stand_in = stand_in_dir / "tiny-mistral-small-3"
    monkeypatch.chdir(stand_in_dir)
    assert same("tiny-mistral-small-3", str(stand_in))  # relative vs absolute
    assert same("/gone/checkout/outputs/stand-ins/tiny-mistral-small-3/", str(stand_in))  # moved
    assert same(str(tmp_path / "elsewhere" / "tiny-mistral-small-3"), str(stand_in))  # rebuilt elsewhere
    assert same(
        "unsloth/Mistral-Small-3.2-24B-Instruct-2506-unsloth-bnb-4bit",
        "mistralai/Mistral-Small-3.2-24B-Instruct-2506",
    )
    assert same(
        "unsloth/Mistral-Small-3.2-24B-Instruct-2506-bnb-4bit", "unsloth/Mistral-Small-3.2-24B-Instruct-2506"
    )
    assert same("axolotl-ai-co/Mistral-Small-4-119B-2603-BF16", "mistralai/Mistral-Small-4-119B-2603")
    assert same("mistralai/Ministral-3-8B-Instruct-2512-BF16", "mistralai/Ministral-3-8B-Instruct-2512")
    snapshot = "/hf/hub/models--mistralai--Mistral-Small-3.2-24B-Instruct-2506/snapshots/0123abcd"
    assert same("mistralai/Mistral-Small-3.2-24B-Instruct-2506", snapshot)
    assert not same(str(stand_in), str(stand_in_dir / "tiny-mistral-small-4"))
    assert not same("mistralai/Ministral-3-3B-Instruct-2512", "mistralai/Ministral-3-8B-Instruct-2512")
    assert not same(
        "mistralai/Mistral-Small-3.1-24B-Instruct-2503", "mistralai/Mistral-Small-3.2-24B-Instruct-2506"
    )
    # two local folders of one name (every course export is written to .../merged) are the same model only
    # when their configs are: a generic folder name says nothing
    import shutil

    for rung, source in (("cpu-tiny", "tiny-mistral-small-3"), ("cpu-tiny-small-4", "tiny-mistral-small-4")):
        (tmp_path / rung / "merged").mkdir(parents=True)
        shutil.copy(stand_in_dir / source / "config.json", tmp_path / rung / "merged" / "config.json")
    assert not same(str(tmp_path / "cpu-tiny" / "merged"), str(tmp_path / "cpu-tiny-small-4" / "merged"))
    (tmp_path / "copy").mkdir()
    shutil.copytree(tmp_path / "cpu-tiny" / "merged", tmp_path / "copy" / "merged")
    assert same(str(tmp_path / "cpu-tiny" / "merged"), str(tmp_path / "copy" / "merged"))


def test_manifest_checksums_match_and_catch_changes(tmp_path):
    import hashlib

    files = [tmp_path / "a.gguf", tmp_path / "sub" / "Modelfile"]
    files[1].parent.mkdir()
    files[0].write_bytes(b"\x00GGUF" * 1000)
    files[1].write_text("FROM ./a.gguf\n")
    manifest = export.write_manifest(tmp_path, files, {"base_model": "stand-in"})
    data = json.loads(manifest.read_text())
    assert data["base_model"] == "stand-in"
    assert data["files"][0] == {
        "file": "a.gguf",
        "bytes": 5000,
        "sha256": hashlib.sha256(b"\x00GGUF" * 1000).hexdigest(),
    }
    assert data["files"][1]["file"] == "sub/Modelfile"
    assert export.verify_manifest(manifest) == []
    files[0].write_bytes(b"\x00GGUF" * 999 + b"\x00GGUX")
    files[1].unlink()
    assert export.verify_manifest(manifest) == [
        "a.gguf: changed (size or sha256 differs)",
        "sub/Modelfile: missing",
    ]
    with pytest.raises(FileExistsError):
        export.write_manifest(tmp_path, [files[0]])


def test_unsloth_reads_the_variables_we_set():
    """API drift: unsloth_zoo must still read the variables that point it at our llama.cpp."""
    import importlib.util
    from pathlib import Path

    source = Path(importlib.util.find_spec("unsloth_zoo").origin).parent.joinpath("llama_cpp.py").read_text()
    for name in export.unsloth_llama_cpp_env(Path("/x")):
        assert name in source, f"unsloth_zoo no longer reads {name}"


def test_pinned_llama_cpp_python_matches_requirements():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "requirements.txt").read_text()
    assert f"llama-cpp-python[server]=={gguf_export.LLAMA_CPP_PYTHON}" in text


# --- The real thing: a tuned stand-in through llama.cpp ------------------------------------------------


def test_merged_model_equals_the_adapter_model(exported):
    processor = exported["processor"]
    ids = processor.apply_chat_template(
        gguf_verify.as_parts(CONVERSATIONS[2]), tokenize=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        merged = exported["model"](input_ids=ids).logits
        adapter = exported["peft"](input_ids=ids).logits
        with exported["peft"].disable_adapter():
            base = exported["peft"](input_ids=ids).logits
    assert torch.allclose(merged, adapter, atol=1e-4)
    assert (merged - base).abs().max() > 0.01  # the adapter is really in there


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_K_M"])
def test_gguf_logits_match_transformers_within_tolerance(exported, qtype):
    llm = gguf_verify.open_gguf(exported["files"][qtype], logits_all=True, n_ctx=1024)
    try:
        parity = gguf_verify.logit_parity(llm, exported["model"], exported["processor"], CONVERSATIONS)
        reply = llm.create_completion(
            gguf_verify.llama_cpp_prompt_ids(llm, CONVERSATIONS[0]), max_tokens=8, temperature=0
        )
    finally:
        llm.close()
    assert parity["positions"] > 100
    assert gguf_verify.within_tolerance(parity, qtype), parity
    assert reply["usage"]["completion_tokens"] >= 1  # llama.cpp generates from every file


def test_quantized_files_are_smaller_and_say_what_fell_back(exported):
    sizes = {q: exported["files"][q].stat().st_size for q in ("F16", "Q8_0", "Q4_K_M")}
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q4_K_M"]
    # the stand-in's 128-wide rows cannot use K-quants (256-blocks); llama.cpp reports its fallbacks
    assert gguf_export.fallback_count(exported["quant_log"]) > 0


def test_embedded_training_template_gives_transformers_token_ids(exported):
    llm = gguf_verify.open_gguf(exported["files"]["F16"], n_ctx=512)
    try:
        meta = llm.metadata
        assert (
            meta["tokenizer.chat_template"] == exported["processor"].tokenizer.chat_template
            or meta["tokenizer.chat_template"] == exported["processor"].chat_template
        )
        assert gguf_verify.template_parity(llm, exported["processor"], CONVERSATIONS) == []
    finally:
        llm.close()


def test_vision_projector_loads_and_answers_an_image(exported):
    import base64

    from course_utils.receipts import load_local

    image = load_local("test")[0]["images"][0]
    uri = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
    llm = gguf_verify.open_gguf(exported["files"]["F16"], mmproj=exported["files"]["mmproj"], n_ctx=2048)
    try:
        out = llm.create_chat_completion(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": uri}},
                        {"type": "text", "text": "Extract."},
                    ],
                }
            ],
            max_tokens=4,
            temperature=0,
        )
    finally:
        llm.close()
    # the prompt holds the image embeddings: far more tokens than the text alone
    assert out["usage"]["prompt_tokens"] > 50


def test_gguf_header_reader_agrees_with_llama_cpp(exported):
    header = gguf_export.read_gguf_kv(exported["files"]["F16"])
    meta = gguf_export.gguf_metadata(exported["files"]["F16"])
    assert header["general.architecture"] == meta["general.architecture"] == "mistral3"
    assert header["tokenizer.ggml.pre"] == "pixtral" and header["tokenizer.ggml.bos_token_id"] == 1
    assert gguf_export.read_gguf_kv(exported["files"]["mmproj"], "clip.projector_type") == "pixtral"
    with pytest.raises(export.ExportError, match="not a GGUF"):
        gguf_export.read_gguf_kv(exported["out"] / "adapter" / "adapter_config.json")


def test_lora_gguf_on_the_base_gguf_equals_the_merged_gguf(exported):
    """The alternative to merging: base GGUF + adapter GGUF (``--lora``) gives the merged model's logits."""
    import numpy as np
    from llama_cpp import Llama

    out, tools = exported["out"], exported["tools"]
    base = gguf_export.convert_to_gguf(
        exported["base_dir"] / "tiny-mistral-small-3", out / "base-f16.gguf", "f16", tools=tools
    )
    adapter = gguf_export.convert_lora_to_gguf(
        out / "adapter", exported["base_dir"] / "tiny-mistral-small-3", out / "adapter-f16.gguf", tools=tools
    )
    assert gguf_export.read_gguf_kv(adapter, "general.type") == "adapter"
    assert adapter.stat().st_size < base.stat().st_size / 20  # an r=4 adapter is tiny
    ids = (
        exported["processor"]
        .apply_chat_template(
            gguf_verify.as_parts(CONVERSATIONS[1]), tokenize=True, return_dict=True, return_tensors="pt"
        )["input_ids"][0]
        .tolist()
    )
    logits = {}
    for name, kwargs in (
        ("merged", {"model_path": str(exported["files"]["F16"])}),
        ("lora", {"model_path": str(base), "lora_path": str(adapter)}),
        ("base", {"model_path": str(base)}),
    ):
        llm = Llama(**kwargs, n_ctx=512, logits_all=True, verbose=False, n_threads=1)
        llm.eval(ids)
        logits[name] = np.asarray(llm.scores[: len(ids)])
        llm.close()
    assert np.abs(logits["base"] - logits["merged"]).max() > 0.01  # the adapter matters
    assert np.abs(logits["lora"] - logits["merged"]).max() < 0.05  # and base + LoRA GGUF = merged


def test_a_non_adapter_result_is_refused(exported, monkeypatch):
    """If llama.cpp's LoRA converter writes anything but an adapter, nothing is handed over."""
    monkeypatch.setattr(gguf_export, "read_gguf_kv", lambda path, key=None: "model")
    with pytest.raises(export.ExportError, match="merge instead"):
        gguf_export.convert_lora_to_gguf(
            exported["out"] / "adapter",
            exported["base_dir"] / "tiny-mistral-small-3",
            exported["out"] / "refused.gguf",
            tools=exported["tools"],
        )
    assert not (exported["out"] / "refused.gguf").exists()


def test_served_replies_equal_in_process_replies_and_report_why_they_ended(exported):
    from course_utils.receipts import load_local, mix_modalities

    rows = mix_modalities(load_local("test")[:6], 0.5, seed=0)
    records = [next(r for r in rows if r.get("images")), next(r for r in rows if not r.get("images"))]
    q4, mmproj = exported["files"]["Q4_K_M"], exported["files"]["mmproj"]
    local_details, served_details = [], []
    llm = gguf_verify.open_gguf(q4, mmproj=mmproj, n_ctx=2048)
    try:
        local = gguf_verify.gguf_replies(
            llm, records, max_new_tokens=12, progress=False, details=local_details
        )
    finally:
        llm.close()
    served = gguf_verify.served_replies(
        q4, records, mmproj=mmproj, max_new_tokens=12, progress=False, details=served_details
    )
    # greedy, same file, same template, same threads: the server process gives the same tokens, image row
    # included (the stand-in's replies may be control tokens only, which read as "": compare the counts too)
    assert served == local
    assert served_details == local_details
    assert all(
        d["finish_reason"] in ("stop", "length") and d["completion_tokens"] <= 12 for d in served_details
    )
    text_only = [
        dict(m, content=[part for part in m["content"] if part.get("type") != "image"])
        if isinstance(m["content"], list)
        else m
        for m in records[0]["messages"][:-1]
    ]
    n_text = len(
        exported["processor"].apply_chat_template(text_only, tokenize=True, return_dict=True)["input_ids"]
    )
    assert served_details[0]["prompt_tokens"] > n_text + 50  # the image's embeddings are in the prompt


def _unsloths_check_llama_cpp():
    """unsloth_zoo's own ``check_llama_cpp``, taken from its source (importing unsloth_zoo needs a GPU)."""
    import ast
    import importlib.util
    import os
    import subprocess
    from pathlib import Path

    path = Path(importlib.util.find_spec("unsloth_zoo").origin).parent / "llama_cpp.py"
    tree = ast.parse(path.read_text())
    wanted = {"check_llama_cpp", "LLAMA_CPP_CONVERTER_FILENAMES"}
    nodes = [
        n
        for n in tree.body
        if (isinstance(n, ast.FunctionDef) and n.name in wanted)
        or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in wanted for t in n.targets))
    ]
    assert len(nodes) == 2, "unsloth_zoo's check_llama_cpp moved: re-read it"
    for node in nodes:  # the default folder is read at import; the test always passes one
        if isinstance(node, ast.FunctionDef):
            node.args.defaults = [ast.Constant(None)]
    namespace = {"os": os, "subprocess": subprocess, "IS_WINDOWS": False, "LLAMA_CPP_DEFAULT_DIR": None}
    module = ast.fix_missing_locations(ast.Module(nodes, type_ignores=[]))
    exec(compile(module, str(path), "exec"), namespace)
    return namespace["check_llama_cpp"]


def test_unsloth_accepts_the_course_tools_folder_offline(exported, tmp_path):
    """Unsloth's save_pretrained_gguf demands an executable llama-quantize even for f16 (fails without)."""
    import shutil

    check = _unsloths_check_llama_cpp()
    bare = tmp_path / "converters-only"
    bare.mkdir()
    shutil.copy(exported["tools"] / "convert_hf_to_gguf.py", bare)
    with pytest.raises(RuntimeError, match="No working quantizer"):
        check(str(bare))
    shim = gguf_export.write_quantize_shim(bare)
    assert check(str(bare)) == (str(shim), str(bare / "convert_hf_to_gguf.py"))
    assert (exported["tools"] / "llama-quantize").is_file()  # llama_cpp_tools() writes it


def test_the_quantize_shim_is_llama_quantize(exported, tmp_path):
    import subprocess

    shim = gguf_export.write_quantize_shim(tmp_path)
    out = tmp_path / "shim-Q4_K_M.gguf"
    # as Unsloth calls it: lower-case type and a thread count, an argument list
    done = subprocess.run(
        [str(shim), str(exported["files"]["F16"]), str(out), "q4_k_m", "2"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-1000:]
    assert export.sha256(out) == export.sha256(exported["files"]["Q4_K_M"])
    bad = subprocess.run([str(shim), "a", "b", "IQ1_S"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown type 'IQ1_S'" in bad.stderr and "Traceback" not in bad.stderr


def test_unsloth_is_pointed_at_the_course_llama_cpp_before_import():
    from course_utils.models import point_unsloth_at_course_llama_cpp

    env = {}
    assert point_unsloth_at_course_llama_cpp(env) == str(gguf_export.default_tools_dir())
    assert env["UNSLOTH_LLAMA_CPP_PATH"].endswith(f"llama.cpp-{gguf_export.LLAMA_CPP_PYTHON}")
    mine = {"UNSLOTH_LLAMA_CPP_PATH": "/opt/my-llama.cpp"}
    assert point_unsloth_at_course_llama_cpp(mine) == "/opt/my-llama.cpp"  # a learner's own choice wins


def _card(vram, ram=83.0, disk=500.0, name="GPU"):
    from course_utils.hardware import HardwareInfo

    return HardwareInfo("cuda", name, vram, ram_gib=ram, disk_free_gib=disk, cpu_count=8, environment="local")


def test_merge_plan_never_loads_a_second_full_copy_on_a_gpu():
    from course_utils.profiles import PROFILES

    # a free Colab T4: 15 GB VRAM, 12.7 GB RAM — Ministral 3 8B in 16-bit (≈16 GiB) fits neither
    t4 = export.plan_merge(PROFILES["t4-16gb"], _card(14.7, ram=12.7, disk=200), llama_cpp_gpu=False)
    assert t4.method == "unsloth-merged-16bit" and t4.load_in_4bit
    assert t4.peak_vram_gib <= 14.7 and t4.peak_ram_gib <= 12.7
    assert t4.parity == "skip"  # the merged 16-bit model does not fit the card to compare
    assert t4.task_quants == ("Q4_K_M",) and t4.task_rows <= 4 and t4.n_gpu_layers == 0  # CPU llama.cpp
    small = export.plan_merge(PROFILES["gpu-24gb"], _card(24.0, disk=300), llama_cpp_gpu=True)
    assert small.method == "unsloth-merged-16bit" and small.peak_vram_gib <= 24
    assert small.n_gpu_layers == -1 and small.task_rows == 16
    big = export.plan_merge(PROFILES["gpu-80gb"], _card(80.0, disk=300), llama_cpp_gpu=True)
    assert big.method == "peft-in-place" and not big.load_in_4bit and big.parity == "before-after"
    assert 48 < big.peak_vram_gib < 80  # one bf16 copy of 24B (≈45 GiB) + margin, not two
    stand_in = export.plan_merge(PROFILES["cpu-tiny"], _card(0))
    assert stand_in.method == "peft-cpu" and stand_in.task_rows is None and stand_in.parity == "in-memory"


def test_merge_plan_checks_disk_before_anything_is_downloaded():
    from course_utils.profiles import PROFILES

    with pytest.raises(export.ExportError, match=r"disk \(\+10 %; 60 GiB is free\)"):
        export.plan_merge(PROFILES["gpu-24gb"], _card(24.0, disk=60), llama_cpp_gpu=True)
    with pytest.raises(export.ExportError, match="needs the GPU it was trained on"):
        from course_utils.hardware import HardwareInfo

        export.plan_merge(PROFILES["gpu-24gb"], HardwareInfo("cpu", "CPU", None, 64, 500, 8, "local"))


def test_the_converters_come_from_a_wheelhouse_without_the_index(tmp_path, monkeypatch):
    """Offline rooms (INSTRUCTOR.md): the sdist in PIP_FIND_LINKS is used as is, no pip call."""
    import subprocess

    house = tmp_path / "wheelhouse"
    house.mkdir()
    sdist = house / f"llama_cpp_python-{gguf_export.LLAMA_CPP_PYTHON}.tar.gz"
    sdist.write_bytes(b"not read here")
    monkeypatch.setenv("PIP_FIND_LINKS", f"/nowhere file://{house}")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip was called although the wheelhouse holds the sdist")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert gguf_export._download_sdist(tmp_path / "dl") == sdist
