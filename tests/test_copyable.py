"""Every lesson cell tagged ``copyable`` runs on its own: pasted into a fresh interpreter with only the
pinned libraries and the files it names (built here on the stand-in), never importing ``course_utils``.

Each cell also carries a ``copy:<name>`` tag. A spec below says what the cell needs (a prelude of
plain assignments, and the copyable cells a learner would paste before it, such as the loading cell),
and checks what it produced — against the course's own functions where the package does the same.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jupytext
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py"))
RESULT = "COPYABLE-RESULT="


@dataclass(frozen=True)
class CopyableCell:
    name: str
    lesson: str
    source: str


def copyable_cells() -> dict[str, CopyableCell]:
    cells: dict[str, CopyableCell] = {}
    for lesson in LESSONS:
        for cell in jupytext.read(lesson, fmt="py:percent").cells:
            tags = cell.metadata.get("tags", [])
            if "copyable" not in tags:
                continue
            names = [t.removeprefix("copy:") for t in tags if t.startswith("copy:")]
            assert len(names) == 1, (
                f"{lesson.name}: a copyable cell needs exactly one copy:<name> tag ({tags})"
            )
            assert names[0] not in cells, f"copy:{names[0]} is used twice"
            cells[names[0]] = CopyableCell(names[0], lesson.name, cell.source)
    return cells


CELLS = copyable_cells()


def bound_names(tree: ast.AST) -> set[str]:
    """Every name a piece of code binds anywhere (assignments, imports, defs, loop and with targets)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def free_names(source: str) -> set[str]:
    tree = ast.parse(source)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - bound_names(tree) - set(dir(builtins))


# --- What each cell needs and what it must produce --------------------------------------------------


@dataclass(frozen=True)
class Spec:
    prelude: Callable[[dict], str]  # plain assignments: the files and values the cell names
    after: tuple[str, ...] = ()  # copyable cells a learner pastes first (e.g. the loading cell)
    check: str = ""  # runs after the cell, in the same interpreter; prints RESULT + json to report
    run: bool = True  # False: GPU-only cells, checked against the pinned libraries' signatures instead


def stand_in(env: dict, four_bit: bool = False) -> str:
    return f"MODEL_ID = {str(env['stand_in'])!r}\nLOAD_IN_4BIT = {four_bit!r}\n"


def preset_prelude(env: dict, **overrides) -> str:
    from course_utils.train import preset_for

    values = preset_for("cpu-tiny", **overrides).as_dict()
    return f"from types import SimpleNamespace\npreset = SimpleNamespace(**{values!r})\n"


def report(expression: str) -> str:
    return f"import json as _json\nprint({RESULT!r} + _json.dumps({expression}))\n"


SPECS: dict[str, Spec] = {
    "load": Spec(
        prelude=stand_in,
        check=report(
            "{'class': type(model).__name__, 'processor': type(processor).__name__,"
            " 'checksum': sum(float(p.double().sum()) for p in model.parameters()),"
            " 'dtype': str(model.dtype)}"
        ),
    ),
    "image-prompt": Spec(
        prelude=lambda env: stand_in(env) + f"IMAGE_PATH = {str(env['image'])!r}\n",
        after=("load",),
        check=report(
            "{'reply': reply, 'image_tokens': image_tokens,"
            " 'prompt_tokens': int(inputs['input_ids'].shape[1])}"
        ),
    ),
    "labels": Spec(
        prelude=stand_in,
        after=("load",),
        check=report("{'ids': ids, 'labels': labels, 'inst_end': INST_END_ID, 'eos': EOS_ID}"),
    ),
    "lora": Spec(
        prelude=lambda env: stand_in(env) + preset_prelude(env) + "trainable_tokens = [5, 7, 1000, 2048]\n",
        after=("load",),
        check=report(
            "{'trainable': sum(p.numel() for p in model.parameters() if p.requires_grad),"
            " 'modules': sorted(n for n, _ in model.named_modules() if n.endswith('lora_A.default'))}"
        ),
    ),
    "loss": Spec(
        prelude=stand_in,
        after=("load",),
        check=textwrap.dedent(
            """
            conversation = [{"role": "user", "content": "Tea 1.50"}, {"role": "assistant", "content": "{}"}]
            batch = processor.apply_chat_template(
                conversation, tokenize=True, return_dict=True, return_tensors="pt"
            )
            labels = batch["input_ids"].clone()
            labels[:, : labels.shape[1] // 2] = -100
            with torch.no_grad():
                reference = model(**batch, labels=labels).loss.item()  # transformers' own causal-LM loss
                ours = response_only_loss(model, {**batch, "labels": labels}).item()
            """
        )
        + report("{'reference': reference, 'ours': ours}"),
    ),
    "train-gpu": Spec(
        prelude=lambda env: (
            stand_in(env)
            + preset_prelude(env)
            + "trainable_tokens = None\ntrain_examples = eval_examples = []\n"
            + "RUN_DIR = 'run'\ncallbacks = []\n"
        ),
        after=("load", "lora"),
        run=False,
    ),
    "train-cpu": Spec(
        prelude=lambda env: (
            stand_in(env)
            + preset_prelude(env, max_steps=4, save_steps=2, logging_steps=1)
            + textwrap.dedent(
                f"""
            import torch
            train_examples = torch.load({str(env["examples"])!r})
            eval_examples = train_examples[:4]
            trainable_tokens = sorted({{t for e in train_examples for t in e["labels"] if t != -100}})
            RUN_DIR = {str(env["tmp"] / "run")!r}
            callbacks = []


            def collator(batch):  # text rows: pad ids, mask and labels to the longest row
                n = max(len(e["input_ids"]) for e in batch)
                def pad(key, value):
                    return torch.tensor([e[key] + [value] * (n - len(e[key])) for e in batch])
                return {{"input_ids": pad("input_ids", 11), "attention_mask": pad("attention_mask", 0),
                        "labels": pad("labels", -100)}}
            """
            )
        ),
        after=("load", "lora", "loss"),
        check="trainer.train()\n"
        + report(
            "{'steps': trainer.state.global_step, 'losses': [h['loss'] for h in trainer.state.log_history"
            " if 'loss' in h], 'args': trainer.args.to_dict(),"
            " 'checkpoints': sorted(p.name for p in __import__('pathlib').Path(RUN_DIR).iterdir())}"
        ),
    ),
    "batch-generate": Spec(
        prelude=lambda env: (
            stand_in(env)
            + textwrap.dedent(
                f"""
            conversations = [
                [{{"role": "user", "content": "Extract: Café Nord, 2 tea 1.50 EUR"}}],
                [{{"role": "user", "content": [{{"type": "image", "image": {str(env["image"])!r}}},
                                             {{"type": "text", "text": "Extract this receipt."}}]}}],
                [{{"role": "system", "content": "JSON only."}}, {{"role": "user", "content": "Hi"}}],
            ]
            """
            )
        ),
        after=("load",),
        check=report("{'replies': replies}"),
    ),
    "merge": Spec(
        prelude=lambda env: (
            f"BASE_ID = {str(env['stand_in'])!r}\nADAPTER_DIR = {str(env['adapter'])!r}\n"
            f"MERGED_DIR = {str(env['tmp'] / 'merged')!r}\nLOAD_IN_4BIT = False\n"
        ),
        check=report("{'files': sorted(p.name for p in Path(MERGED_DIR).iterdir())}"),
    ),
    "convert": Spec(
        prelude=lambda env: (
            f"LLAMA_CPP_DIR = {str(env['tools'])!r}\nMERGED_DIR = {str(env['merged'])!r}\n"
            f"GGUF_DIR = {str(env['tmp'])!r}\n"
            f"PROJECTOR_FIX = {str(ROOT / 'course_utils' / 'gguf_convert.py')!r}\n"
        ),
        check=report("{'model': str(model_gguf), 'projector': str(projector_gguf)}"),
    ),
    "quantize": Spec(
        prelude=lambda env: f"F16_GGUF = {str(env['f16'])!r}\nGGUF_DIR = {str(env['tmp'])!r}\n",
        check=report("{k: str(v) for k, v in quantized.items()}"),
    ),
    "modelfile": Spec(
        prelude=lambda env: (
            f"GGUF_DIR = {str(env['tmp'])!r}\nSYSTEM_PROMPT = {env['system']!r}\nGGUF_ADDS_BOS = False\n"
        ),
        check=report("{'path': str(modelfile_path)}"),
    ),
    "openai-client": Spec(
        prelude=lambda env: f"BASE_URL = {env['base_url']!r}\nIMAGE_PATH = {str(env['image'])!r}\n",
        check=report(
            "{'content': response.choices[0].message.content, 'prompt_tokens': response.usage.prompt_tokens}"
        ),
    ),
    "gradio": Spec(
        prelude=lambda env: f"BASE_URL = {env['base_url']!r}\n",
        check=report(
            "{'app': type(chat_app).__name__, 'turns': len(list(respond('Tea 1.50 EUR', []))), "
            # the history as gradio 6's ChatInterface passes it: every content a list of typed parts
            "'second_turn': list(respond('And the total?', ["
            "{'role': 'user', 'metadata': None, 'options': None, "
            "'content': [{'type': 'text', 'text': 'Tea 1.50 EUR'}]}, "
            "{'role': 'assistant', 'metadata': None, 'options': None, "
            "'content': [{'type': 'text', 'text': '{\\\"total\\\": 1.5}'}]}]))[-1:], "
            "'texts': [text_of('plain'), text_of([{'type': 'text', 'text': 'a'}, "
            "{'type': 'file', 'file': {'path': 'x.png'}}, {'type': 'text', 'text': 'b'}])]}"
        ),
    ),
    "vllm": Spec(prelude=lambda env: "", check=report("{'command': vllm_command}")),
    "agent-loop": Spec(
        prelude=lambda env: (
            f"BASE_URL = {env['tool_base_url']!r}\n"
            f"TOOLS = {__import__('course_utils.tools', fromlist=['TOOLS']).TOOLS!r}\n"
            "FUNCTIONS = {'convert_currency': lambda amount, from_currency, to_currency: "
            "{'amount': amount, 'currency': to_currency}, "
            "'sum_amounts': lambda amounts: {'sum': sum(amounts)}, "
            "'lookup_merchant': lambda name: {'name': name, 'found': False}}\n"
            "SYSTEM_PROMPT = "
            f"{__import__('course_utils.tools', fromlist=['SYSTEM_PROMPT']).SYSTEM_PROMPT!r}\n"
        ),
        check=report("{'transcript': transcript}"),
    ),
}


def test_every_copyable_cell_has_a_spec_and_the_course_has_enough_of_them():
    assert sorted(CELLS) == sorted(SPECS)
    assert len(CELLS) >= 12
    lessons = {cell.lesson[:2] for cell in CELLS.values()}
    assert {"01", "02", "03", "04", "05", "06", "07", "08"} <= lessons


@pytest.mark.parametrize("name", sorted(CELLS))
def test_copyable_cell_is_plain_library_code(name):
    cell = CELLS[name]
    tree = ast.parse(cell.source)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] == "course_utils" for m in imported), f"copy:{name} imports course_utils"
    assert not any(line.lstrip().startswith(("%", "!")) for line in cell.source.splitlines())
    spec = SPECS[name]
    provided = bound_names(ast.parse(spec.prelude(FAKE_ENV)))
    for before in spec.after:
        provided |= bound_names(ast.parse(CELLS[before].source))
    missing = free_names(cell.source) - provided
    assert not missing, f"copy:{name} uses {sorted(missing)} that neither its prelude nor {spec.after} define"
    first_comment = next(line for line in cell.source.splitlines() if not line.startswith("# NBVAL"))
    assert first_comment.startswith("# "), f"copy:{name} should open with a comment saying what it needs"


FAKE_ENV = {
    key: Path("/x") for key in ("stand_in", "image", "examples", "tmp", "adapter", "merged", "tools", "f16")
} | {"system": "s", "base_url": "http://127.0.0.1:1/v1", "tool_base_url": "http://127.0.0.1:1/v1"}


def run_standalone(name: str, env: dict, timeout: int = 900, spec: Spec | None = None) -> dict:
    spec = spec or SPECS[name]
    script = "\n\n".join(
        [spec.prelude(env), *(CELLS[b].source for b in spec.after), CELLS[name].source, spec.check]
        + ['import sys\nassert "course_utils" not in sys.modules, "the cell imported course_utils"']
    )
    path = env["tmp"] / f"copy_{name}.py"
    path.write_text(script)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    environment.pop("LAUNCH_DEMO", None)
    done = subprocess.run(
        [sys.executable, str(path)],
        cwd=env["tmp"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )
    assert done.returncode == 0, (
        f"copy:{name} failed standalone:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT) :]) if lines else {}


# --- Files the cells name, built once on the stand-in -------------------------------------------------


@pytest.fixture(scope="module")
def env(stand_in_dir, exported, tmp_path_factory):
    from course_utils.data import tokenize_record
    from course_utils.receipts import SYSTEM_PROMPT, load_local, mix_modalities

    tmp = tmp_path_factory.mktemp("copyable")
    processor = exported["processor"]
    text_rows = [r for r in mix_modalities(load_local("train"), 0.5, seed=0) if not r.get("images")][:8]
    examples = [tokenize_record(r, processor, max_seq_length=512) for r in text_rows]
    torch.save(examples, tmp / "examples.pt")
    return {
        "tmp": tmp,
        "stand_in": stand_in_dir / "tiny-mistral-small-3",
        "image": next((ROOT / "data" / "receipts" / "images").glob("test-*.png")),
        "examples": tmp / "examples.pt",
        "adapter": exported["out"] / "adapter",
        "merged": exported["out"] / "merged",
        "tools": exported["tools"],
        "f16": exported["files"]["F16"],
        "system": SYSTEM_PROMPT,
    }


@pytest.fixture(scope="module")
def served(env, exported):
    from course_utils import serve

    with serve.llama_server(
        exported["files"]["Q4_K_M"], mmproj=exported["files"]["mmproj"], alias="receipts", n_ctx=2048
    ) as server:
        yield {**env, "base_url": server.url + "/v1"}


def own_dir(env: dict, name: str) -> dict:
    folder = env["tmp"] / name
    folder.mkdir(exist_ok=True)
    return {**env, "tmp": folder}


# --- Each cell, standalone --------------------------------------------------------------------------


@pytest.mark.slow
def test_load_cell_loads_what_the_course_loads(env, stand_in_dir):
    from course_utils.models import load

    got = run_standalone("load", own_dir(env, "load"))
    course = load("cpu-tiny", stand_in_dir=stand_in_dir).model
    assert got["class"] == type(course).__name__ == "Mistral3ForConditionalGeneration"
    assert got["processor"] == "PixtralProcessor" and got["dtype"] == "torch.float32"
    with torch.no_grad():
        checksum = sum(float(p.double().sum()) for p in course.parameters())
    assert got["checksum"] == pytest.approx(checksum)


@pytest.mark.slow
def test_load_cell_in_4bit_quantizes_the_language_model_only(env):
    four_bit = Spec(
        prelude=lambda e: stand_in(e, four_bit=True),
        check=report(
            "{'quantized': sorted({n.split('.')[1] for n, m in model.named_modules()"
            " if type(m).__name__ == 'Linear4bit'})}"
        ),
    )
    got = run_standalone("load", own_dir(env, "load4"), spec=four_bit)
    assert got["quantized"] == ["language_model"]  # vision tower, projector and lm_head stay 16-bit


@pytest.mark.slow
def test_image_prompt_cell_puts_the_image_in_the_prompt_and_matches_the_course(env, processor, stand_in_dir):
    from course_utils.chat import generate, user_message
    from course_utils.models import load

    got = run_standalone("image-prompt", own_dir(env, "image"))
    assert got["image_tokens"] > 10
    model, processor, _ = load("cpu-tiny", stand_in_dir=stand_in_dir)
    question = [user_message("What is the name of the shop on this receipt?", [str(env["image"])])]
    assert got["reply"] == generate(model, processor, question, max_new_tokens=24)


@pytest.mark.slow
def test_labels_cell_equals_the_package_labels(env):
    from course_utils import data

    got = run_standalone("labels", own_dir(env, "labels"))
    assert (got["inst_end"], got["eos"]) == (data.INST_END_ID, data.EOS_ID)
    assert got["labels"] == data.response_only_labels(got["ids"])
    assert sum(label != -100 for label in got["labels"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("model_key", ["mistral-small-3.2", "mistral-small-4"])
def test_lora_cell_adds_the_adapters_the_course_adds(env, stand_in_dir, model_key):
    """On Small 4 too: the cell once matched dense names only, so its MLA projections and routed experts
    went untrained (o_proj and the shared expert alone) and lesson 04 never learned the format there."""
    from course_utils.models import load
    from course_utils.train import add_lora, preset_for

    small_4 = model_key == "mistral-small-4"
    folder = {**own_dir(env, f"lora-{model_key}")}
    if small_4:
        folder["stand_in"] = stand_in_dir / "tiny-mistral-small-4"
    got = run_standalone("lora", folder)
    base = load("cpu-tiny", model=model_key, stand_in_dir=stand_in_dir).model
    course = add_lora(base, preset_for("cpu-tiny"), [5, 7, 1000, 2048])
    modules = sorted(n for n, _ in course.named_modules() if n.endswith("lora_A.default"))
    assert got["modules"] == modules and not any("vision_tower" in m for m in modules)
    assert got["trainable"] == sum(p.numel() for p in course.parameters() if p.requires_grad)
    if small_4:  # every projection of the MLA attention, and the routed experts' 3-D weights
        for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "mlp.experts"):
            assert any(f"{name}.lora_A" in m for m in modules), name


@pytest.mark.slow
def test_loss_cell_equals_transformers_loss_on_labelled_positions(env):
    got = run_standalone("loss", own_dir(env, "loss"))
    assert got["ours"] == pytest.approx(got["reference"], rel=1e-4)


@pytest.mark.slow
def test_cpu_trainer_cell_trains_checkpoints_and_uses_the_course_arguments(env):
    from course_utils.train import preset_for, training_arguments

    folder = own_dir(env, "train")
    got = run_standalone("train-cpu", folder)
    assert got["steps"] == 4 and len(got["losses"]) == 4
    assert all(loss == loss and loss < 20 for loss in got["losses"])  # finite
    assert got["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    preset = preset_for("cpu-tiny", max_steps=4, save_steps=2, logging_steps=1)
    course = training_arguments(preset, folder["tmp"] / "run", use_cpu=True, eval_steps=2).to_dict()
    differing = {k for k in course if course[k] != got["args"].get(k)}
    assert not differing, {k: (course[k], got["args"].get(k)) for k in differing}


@pytest.mark.slow
def test_batch_generation_cell_equals_generate_batch(env, stand_in_dir):
    from course_utils.chat import generate_batch
    from course_utils.models import load

    got = run_standalone("batch-generate", own_dir(env, "batch"))
    model, processor, _ = load("cpu-tiny", stand_in_dir=stand_in_dir)
    namespace: dict = {}
    exec(SPECS["batch-generate"].prelude(env), namespace)
    expected = generate_batch(model, processor, namespace["conversations"], max_new_tokens=64, batch_size=8)
    assert got["replies"] == expected and len(expected) == 3


@pytest.mark.slow
def test_merge_cell_gives_the_merged_model(env, exported):
    from transformers import AutoModelForImageTextToText

    folder = own_dir(env, "merge")
    got = run_standalone("merge", folder)
    assert "model.safetensors" in got["files"] and "tokenizer.json" in got["files"]
    merged = AutoModelForImageTextToText.from_pretrained(folder["tmp"] / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 3, 1050, 1051, 4]])
    with torch.no_grad():
        gap = (merged(input_ids=ids).logits - exported["model"](input_ids=ids).logits).abs().max().item()
    assert gap < 1e-5
    with pytest.raises(AssertionError, match="is not empty"):
        run_standalone("merge", folder)  # a second run refuses to write into the filled folder


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.slow
def test_convert_cell_writes_the_course_gguf_and_a_working_projector(env, exported):
    from course_utils import gguf_export

    got = run_standalone("convert", own_dir(env, "convert"))
    assert gguf_export.read_gguf_kv(got["model"], "general.architecture") == "mistral3"
    assert sha256(got["model"]) == sha256(exported["files"]["F16"])
    assert b"v.token_embd.img_break" in Path(got["projector"]).read_bytes()
    assert sha256(got["projector"]) == sha256(exported["files"]["mmproj"])


@pytest.mark.slow
def test_quantize_cell_is_byte_identical_to_the_course_quantizer(env, exported):
    got = run_standalone("quantize", own_dir(env, "quantize"))
    assert sorted(got) == ["Q4_K_M", "Q5_K_M", "Q8_0"]
    for qtype in ("Q8_0", "Q4_K_M"):
        assert sha256(got[qtype]) == sha256(exported["files"][qtype])


@pytest.mark.slow
def test_modelfile_cell_matches_the_training_template_and_the_ggufs_bos(env, exported):
    from course_utils import gguf_export, ollama

    got = run_standalone("modelfile", own_dir(env, "modelfile"))
    written = Path(got["path"]).read_text()
    derived = ollama.modelfile(
        "receipts-Q4_K_M.gguf",
        ollama.template_parts(exported["processor"]),
        system=env["system"],
        num_ctx=4096,
    )

    def without_comments(text):
        return [line for line in text.splitlines() if not line.startswith("#")]

    assert without_comments(written) == without_comments(derived)
    # the prelude's GGUF_ADDS_BOS = False is what the course's GGUF says, so <s> belongs in the template
    assert gguf_export.read_gguf_kv(exported["files"]["Q4_K_M"], "tokenizer.ggml.add_bos_token") is False
    assert 'TEMPLATE """<s>{{- range' in written


@pytest.mark.slow
def test_openai_client_cell_sends_the_image(served):
    got = run_standalone("openai-client", own_dir(served, "client"))
    assert isinstance(got["content"], str)
    assert got["prompt_tokens"] > 40  # the image's tokens are in the prompt, not only the text's


@pytest.mark.slow
def test_gradio_cell_builds_a_local_app_that_answers(served):
    got = run_standalone("gradio", own_dir(served, "gradio"))
    assert got["app"] == "ChatInterface"
    assert got["turns"] >= 0  # the stand-in may say nothing at all; the request itself must succeed
    # a history in gradio's own format reaches the server as text (it answered 422 to the parts list)
    assert isinstance(got["second_turn"], list)
    assert got["texts"] == ["plain", "a\n\nb"]  # text parts joined, a file part left out


def test_vllm_cell_equals_the_course_command(env):
    from course_utils import serve

    got = run_standalone("vllm", own_dir(env, "vllm"))
    assert got["command"] == serve.vllm_command("mistral-small-3.2", "mistral", tensor_parallel=1)


# --- GPU-only cells: every keyword they pass exists in the pinned libraries -------------------------


def keyword_calls(source: str) -> dict[str, set[str]]:
    """``Name(...)`` / ``Name.method(...)`` calls in a cell and the keywords each passes."""
    calls: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else f"{func.value.id}.{func.attr}"
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                else None
            )
            if name:
                calls.setdefault(name, set()).update(k.arg for k in node.keywords if k.arg)
    return calls


def unsloth_parameters(package: str, class_name: str, method: str) -> set[str]:
    from test_api_drift import _find_class_method

    fn = _find_class_method(package, class_name, method)
    return {a.arg for a in fn.args.args + fn.args.kwonlyargs}


@pytest.mark.parametrize("name", ["train-gpu", "lora", "load", "merge"])
def test_gpu_branches_pass_only_keywords_the_pinned_libraries_take(name):
    import inspect

    from trl import SFTConfig, SFTTrainer

    accepted = {
        "SFTConfig": set(inspect.signature(SFTConfig).parameters),
        "SFTTrainer": set(inspect.signature(SFTTrainer).parameters),
        "UnslothVisionDataCollator": unsloth_parameters(
            "unsloth_zoo", "UnslothVisionDataCollator", "__init__"
        ),
        "FastVisionModel.get_peft_model": unsloth_parameters("unsloth", "FastBaseModel", "get_peft_model"),
        "FastVisionModel.from_pretrained": unsloth_parameters("unsloth", "FastModel", "from_pretrained"),
    }
    calls = keyword_calls(CELLS[name].source)
    checked = [call for call in calls if call in accepted]
    assert checked, f"copy:{name} makes none of the GPU calls this test knows"
    for call in checked:
        unknown = calls[call] - accepted[call]
        assert not unknown, f"copy:{name}: {call} does not take {sorted(unknown)} in the pinned version"


def test_gpu_merge_writes_16bit_shard_by_shard_without_a_second_copy():
    """On a GPU the merge cell must not load the base again in 16-bit beside the tuned model."""
    import importlib.util

    tree = ast.parse(CELLS["merge"].source)
    gpu_branch = next(n for n in tree.body if isinstance(n, ast.If) and "cuda" in ast.unparse(n.test))
    code = ast.unparse(gpu_branch.body)
    assert "save_pretrained_merged" in code and "merged_16bit" in code
    assert "AutoModelForImageTextToText" not in code and "PeftModel" not in code
    save = Path(importlib.util.find_spec("unsloth").origin).parent / "save.py"
    assert '"merged_16bit"' in save.read_text()  # the pinned Unsloth still takes that save_method


def test_gpu_training_cell_does_nothing_without_a_gpu():
    tree = ast.parse(CELLS["train-gpu"].source)
    guarded = [n for n in tree.body if isinstance(n, ast.If)]
    assert len(guarded) == 1 and "torch.cuda.is_available()" in ast.unparse(guarded[0].test)
    assert all(isinstance(n, (ast.Import, ast.ImportFrom, ast.If)) for n in tree.body)


def test_gpu_training_cell_evaluates_counts_tokens_and_truncates_at_the_preset():
    calls = keyword_calls(CELLS["train-gpu"].source)
    # without these a GPU run shows no eval curve, no tokens/s, and sequences cut at 128k, not the preset
    assert {"eval_strategy", "eval_steps", "include_num_input_tokens_seen", "bf16", "fp16"} <= calls[
        "SFTConfig"
    ]
    assert "max_seq_length" in calls["UnslothVisionDataCollator"]
    assert "torch.cuda.is_bf16_supported()" in CELLS["train-gpu"].source  # T4/V100: fp16, not a crash


@pytest.mark.slow
def test_agent_loop_cell_is_the_course_agent_against_a_tool_server(env, exported):
    from course_utils import serve, tools

    with serve.llama_tool_server(exported["files"]["F16"], alias="tools", n_ctx=2048) as server:
        got = run_standalone("agent-loop", {**own_dir(env, "agent"), "tool_base_url": server.url + "/v1"})
        client = serve.client(server.url + "/v1")
        question = "Café Lumière\nTOTAL 12.40 EUR\n\nConvert the total to USD."
        functions = {
            "convert_currency": lambda amount, from_currency, to_currency: {
                "amount": amount,
                "currency": to_currency,
            },
            "sum_amounts": lambda amounts: {"sum": sum(amounts)},
            "lookup_merchant": lambda name: {"name": name, "found": False},
        }
        course = tools.run_agent(
            client,
            "tools",
            question,
            tools.TOOLS,
            functions,
            system=tools.SYSTEM_PROMPT,
            extra_body={"repeat_penalty": 1.0},
        )
    transcript = got["transcript"]
    assert transcript[0] == {"role": "system", "content": tools.SYSTEM_PROMPT}
    assert transcript[1] == {"role": "user", "content": question} and transcript[-1]["role"] == "assistant"
    assert transcript == json.loads(json.dumps(course, default=str))  # greedy: the same conversation


@pytest.mark.parametrize("name", sorted(CELLS))
def test_a_cell_names_every_preset_field_it_reads(name):
    # `preset` is a course object: a learner who copies the cell must see which attributes to provide
    source = CELLS[name].source
    header = "\n".join(line for line in source.splitlines() if line.startswith("#"))
    read = set(re.findall(r"\bpreset\.([a-z_0-9]+)", source))
    missing = sorted(field for field in read if not re.search(rf"\b{field}\b", header))
    assert not missing, f"copy:{name} reads preset.{missing} without naming them in its comments"
