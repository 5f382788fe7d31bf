"""``python -m course_utils doctor | tiny | run`` — the course's command line.

Backs lesson 00 (doctor, stand-ins) and the README's commands.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

# (distribution name, import name or None when importing has side effects, required?)
PACKAGES = [
    ("torch", "torch", True),
    ("torchvision", "torchvision", True),
    ("transformers", "transformers", True),
    ("trl", "trl", True),
    ("peft", "peft", True),
    ("datasets", "datasets", True),
    ("accelerate", "accelerate", True),
    ("bitsandbytes", None, True),  # imported only where 4-bit is used
    ("mistral-common", "mistral_common", True),
    ("unsloth", None, True),  # never imported here: the import patches transformers/TRL
    ("unsloth_zoo", None, True),
    ("matplotlib", "matplotlib", True),
    ("ipywidgets", "ipywidgets", True),
    ("pillow", "PIL", True),
    ("llama_cpp_python", "llama_cpp", True),  # GGUF export and the local server (lessons 06-07)
    ("openai", "openai", True),
    ("gradio", None, True),  # imported by lesson 07 only (slow import)
    ("litellm", None, True),
    ("nbval", None, False),
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# Subcommands that live beside their code: each module has ``add_parser(subparsers)`` and imports
# nothing heavy at module level (the CLI imports them to build its help).
COMMAND_MODULES = ("course_utils.costs", "course_utils.launch")


def read_pins(requirements: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, names normalised (``_`` and case)."""
    pins = {}
    for line in requirements.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


# Colab and some pods ship their own CUDA torch (and the triton/xformers built for it): the course keeps
# it rather than downloading another few GB, so a different version here is reported, not a failure.
KEPT_FROM_PLATFORM = {"torch", "torchvision", "triton", "xformers"}


@dataclass(frozen=True)
class PackageCheck:
    name: str
    status: Literal["OK", "NOTE", "FAIL"]
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"

    def line(self) -> str:
        return f"[{self.status}] {self.name:<16} {self.detail}"


def check_packages(pins: dict[str, str] | None = None) -> list[PackageCheck]:
    """One check per package. A version other than the pinned one is a FAIL — except torch and the
    packages built against it, which are a NOTE (a platform's own CUDA torch is kept on purpose)."""
    rows = []
    for dist, module, required in PACKAGES:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            status = "FAIL" if required else "OK"
            rows.append(PackageCheck(dist, status, "not installed" + ("" if required else " (optional)")))
            continue
        status, detail = "OK", version
        want = (pins or {}).get(dist.lower().replace("_", "-"))
        if want and want != version:
            if dist in KEPT_FROM_PLATFORM:
                status, detail = "NOTE", f"{version} kept (the course was tested with {want})"
            else:
                status, detail = "FAIL", f"{version} installed, requirements.txt pins {want}"
        if status != "FAIL" and module:
            try:
                __import__(module)
            except Exception as exc:  # a broken install: say why, don't crash the report
                status, detail = "FAIL", f"{version} installed but `import {module}` fails: {exc}"
        rows.append(PackageCheck(dist, status, detail))
    return rows


def doctor(args) -> int:
    from course_utils.hardware import describe_profiles, detect
    from course_utils.profiles import resolve_profile

    req = REPO_ROOT / "requirements.txt"
    pins = read_pins(req) if req.is_file() else None
    failed = False
    print(f"Python {sys.version.split()[0]}  ({sys.executable})")
    for check in check_packages(pins):
        failed |= not check.ok
        print(check.line())
    hw = detect(args.path)
    if hw.unusable_gpu:
        failed = True
        print(f"[FAIL] GPU              {hw.unusable_gpu}")
    print(
        f"[OK] accelerator      {hw.accelerator} — {hw.device_name}"
        + (f", {hw.vram_gib:.1f} GiB VRAM" if hw.vram_gib else "")
    )
    print(f"[OK] memory           {hw.ram_gib:.1f} GiB RAM, {hw.cpu_count} CPU cores")
    disk_ok = hw.disk_free_gib >= 2
    failed |= not disk_ok
    print(
        f"[{'OK' if disk_ok else 'FAIL'}] disk             {hw.disk_free_gib:.1f} GiB free"
        + ("" if disk_ok else " (the course needs at least 2 GiB even on CPU)")
    )
    try:
        profile = resolve_profile(args.profile, hardware=hw)
        print(f"[OK] profile          {profile.name} — {profile.description}")
    except ValueError as exc:
        failed = True
        print(f"[FAIL] profile        {exc}")
    for row in describe_profiles(hw):
        print(
            f"       {'fits ' if row['fits'] else 'no   '} {row['profile']:<9} "
            f"{row['model']:<22} {row['why']}"
        )
    if failed:
        print("\nSome checks failed. Fix: `pip install -r requirements.txt` in this environment.")
    return 1 if failed else 0


def tiny(args) -> int:
    from course_utils.tiny import STAND_INS, build_stand_in, stand_in_info

    names = args.name or list(STAND_INS)
    for name in names:
        t0 = time.perf_counter()
        path = build_stand_in(name, args.out, force=args.force)
        info = stand_in_info(path)
        print(
            f"{name}: {path}  ({info['num_params'] / 1e6:.1f}M parameters, {time.perf_counter() - t0:.1f} s)"
        )
    return 0


def data_generate(args) -> int:
    from course_utils.receipts import generate_dataset

    try:
        counts = generate_dataset(args.out, seed=args.seed, force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(", ".join(f"{split}: {n}" for split, n in counts.items()), f"records written to {args.out}/")
    return 0


def data_validate(args) -> int:
    """Row-numbered report; exit 1 when any row is invalid or there are no rows, 2 when the file cannot
    be read at all (missing, another encoding, not JSON/Parquet: one line says where and the fix)."""
    from course_utils.data import validate_file, write_jsonl

    if args.write_valid:  # refused before any work: the output is JSON Lines, and never the input itself
        target = Path(args.write_valid)
        if target.suffix != ".jsonl":
            print(
                f"error: --write-valid writes JSON Lines: name it *.jsonl, not {target.name}", file=sys.stderr
            )
            return 2
        if target.resolve() == Path(args.file).resolve():
            print(
                f"error: --write-valid {target} is the file being validated: write elsewhere", file=sys.stderr
            )
            return 2
    try:
        processor = None
        if args.max_seq_length is not None:
            from transformers import AutoProcessor

            if args.model:
                processor = AutoProcessor.from_pretrained(args.model)
            else:  # the stand-in carries the real Tekken tokenizer: same token counts as the real models
                from course_utils.tiny import build_stand_in

                processor = AutoProcessor.from_pretrained(build_stand_in("tiny-mistral-small-3"))
        report = validate_file(
            args.file,
            encoding=args.encoding,
            fmt=args.format,
            processor=processor,
            max_seq_length=args.max_seq_length,
            strip_whitespace=args.strip_whitespace,
            drop_duplicates=args.drop_duplicates,
            fix_tool_call_ids=args.fix_tool_call_ids,
        )
        for issue in report.issues:
            print(issue)
        for fix in report.fixes:
            print("fixed:", fix)
        for note in report.notes:
            print("note:", note)
        print(report.summary())
        if args.write_valid and not report.valid:  # invalid rows (exit 1), not an unreadable file (2)
            print(f"no rows to write: nothing written to {args.write_valid}", file=sys.stderr)
        elif args.write_valid:
            write_jsonl(
                report.valid, args.write_valid, overwrite=args.overwrite, base_dir=Path(args.file).parent
            )
            print(f"wrote {len(report.valid)} valid rows to {args.write_valid}")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


def vram(args) -> int:
    from course_utils.memory import ARCHITECTURES, estimate_training_memory

    if args.model not in ARCHITECTURES:
        print(
            f"error: unknown model {args.model!r}; choose one of {', '.join(ARCHITECTURES)}", file=sys.stderr
        )
        return 2
    try:
        est = estimate_training_memory(
            args.model,
            args.method,
            args.seq_len,
            args.batch_size,
            args.lora_r,
            args.grad_checkpointing,
            args.optimizer,
            fused_cross_entropy=False if args.plain_loss else None,
            backend=args.backend,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.as_dict(), indent=2))
    else:
        print(
            f"{args.model} {args.method}, seq {args.seq_len} x batch {args.batch_size}, r={args.lora_r}, "
            f"gradient checkpointing {'on' if args.grad_checkpointing else 'off'}:"
        )
        print(est.breakdown())
    return 0


def discover_notebooks(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def run(args) -> int:
    """Execute every notebook in order into ``--out``; print notebook, status, seconds."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    notebooks = discover_notebooks(Path(args.notebooks))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(o) for o in args.only)]
    if not notebooks:
        print(f"No notebooks found in {args.notebooks}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["COURSE_PROFILE"] = (
        args.profile if args.profile != "auto" else os.environ.get("COURSE_PROFILE", "")
    )
    if getattr(args, "model", None):  # every notebook's MODEL follows COURSE_MODEL
        os.environ["COURSE_MODEL"] = args.model
    rows, failed = [], False
    for nb_path in notebooks:
        nb = nbformat.read(nb_path, as_version=4)
        client = NotebookClient(
            nb,
            timeout=args.timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(nb_path.parent)}},
        )
        t0 = time.perf_counter()
        status = "ok"
        try:
            client.execute()
        except CellExecutionError as exc:
            status, failed = "FAILED", True
            print(f"\n{nb_path.name} failed:\n{str(exc)[-2000:]}", file=sys.stderr)
        except DeadKernelError:
            status, failed = "FAILED", True
            print(
                f"\n{nb_path.name}: the kernel died (often out of memory: close other notebooks, or pick a "
                "smaller profile); the cells before it are in the executed notebook",
                file=sys.stderr,
            )
        except CellTimeoutError as exc:
            status, failed = "FAILED", True
            print(
                f"\n{nb_path.name}: a cell ran past --timeout {args.timeout} s\n{str(exc)[-500:]}",
                file=sys.stderr,
            )
        seconds = time.perf_counter() - t0
        nbformat.write(nb, out / nb_path.name)
        rows.append({"notebook": nb_path.name, "status": status, "seconds": round(seconds, 1)})
        print(f"{nb_path.name:<32} {status:<7} {seconds:7.1f} s", flush=True)
        if status != "ok" and not args.keep_going:
            break
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'total':<32} {'FAILED' if failed else 'ok':<7} {sum(r['seconds'] for r in rows):7.1f} s")
    print(f"Executed notebooks and summary.json are in {out}/")
    return 1 if failed else 0


def checkpoint(args) -> int:
    """Skip ahead: run lessons 00 … ``--upto`` (their notebooks, in order) so a later lesson finds the
    outputs it builds on — in a fresh Colab runtime, or a workshop seat that starts at lesson 05."""
    notebooks = discover_notebooks(Path(args.notebooks))
    upto = args.upto.zfill(2)
    known = sorted({nb.name[:2] for nb in notebooks})
    if upto not in known:
        print(f"error: --upto {args.upto!r}: choose one of {', '.join(known)}", file=sys.stderr)
        return 2
    args.only = [nb.name[:2] for nb in notebooks if nb.name[:2] <= upto]
    args.keep_going = False
    print(f"Running lessons {args.only[0]}–{upto} to produce their outputs (skip-ahead)", flush=True)
    code = run(args)
    if code == 0:
        from course_utils.paths import outputs_dir

        made = sorted(str(p.relative_to(outputs_dir())) for p in outputs_dir().glob("*/*") if p.is_dir())
        print("outputs now in place:", ", ".join(made) or "none")
        print(f"Lesson {int(upto) + 1:02d} can start from here.")
    return code


def build_parser() -> argparse.ArgumentParser:
    from course_utils.profiles import STAND_IN_OF_MODEL

    parser = argparse.ArgumentParser(prog="python -m course_utils", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="check packages, accelerator, disk and the chosen profile")
    p.add_argument("--profile", default="auto")
    p.add_argument("--path", default=".", help="where downloads and outputs go (for the disk check)")
    p.set_defaults(func=doctor)

    p = sub.add_parser("tiny", help="build the offline stand-in models")
    p.add_argument("--out", default=None, help="default: outputs/stand-ins under the course root")
    p.add_argument(
        "--name",
        action="append",
        choices=sorted(set(STAND_IN_OF_MODEL.values())),  # course_utils.tiny.STAND_INS, without torch
        help="build only this stand-in (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if a matching build is cached")
    p.set_defaults(func=tiny)

    p = sub.add_parser("data", help="the course dataset")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    g = data_sub.add_parser("generate", help="render the receipts dataset (seeded, byte-identical)")
    g.add_argument("--out", default="data/receipts")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--force", action="store_true", help="overwrite an existing dataset")
    g.set_defaults(func=data_generate)
    v = data_sub.add_parser(
        "validate",
        help="check a .jsonl/.json/.parquet file (or .gz) row by row (exit 1 if any row is invalid)",
    )
    v.add_argument("file")
    v.add_argument(
        "--format",
        default="auto",
        choices=["auto", "alpaca", "sharegpt", "openai", "plateforme", "prompt_completion", "text"],
    )
    v.add_argument("--encoding", help="the file's text encoding when it is not UTF-8 (e.g. cp1252, utf-16)")
    v.add_argument(
        "--fix-tool-call-ids",
        action="store_true",
        help="safe fix: rewrite tool-call ids to Mistral's 9 characters, consistently per row; reported",
    )
    v.add_argument(
        "--model", help="model/processor folder for token counts (default: the stand-in's tokenizer)"
    )
    v.add_argument("--max-seq-length", type=int, help="flag rows longer than this many tokens")
    v.add_argument("--write-valid", metavar="OUT", help="write the valid rows (canonical format) to OUT")
    v.add_argument("--overwrite", action="store_true", help="allow --write-valid to replace an existing file")
    v.add_argument("--strip-whitespace", action="store_true", help="safe fix: strip text; reported")
    v.add_argument("--drop-duplicates", action="store_true", help="safe fix: drop exact duplicates; reported")
    v.set_defaults(func=data_validate)

    p = sub.add_parser("vram", help="estimate peak training memory from a model's config")
    p.add_argument("--model", required=True, help="e.g. mistral-small-3.2, mistral-small-4, ministral-3-8b")
    p.add_argument("--method", choices=["qlora", "lora", "full"], default="qlora")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--optimizer", choices=["adamw_8bit", "adamw_torch"], default="adamw_8bit")
    p.add_argument(
        "--plain-loss", action="store_true", help="un-fused cross-entropy (materialised fp32 logits)"
    )
    p.add_argument(
        "--backend",
        choices=["unsloth", "transformers"],
        default="unsloth",
        help="Unsloth (offloaded gradient checkpoints, fused loss) or transformers+peft",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=vram)

    from course_utils.profiles import COURSE_MODELS

    p = sub.add_parser("run", help="execute every notebook in order")
    p.add_argument("--profile", default="auto")
    p.add_argument(
        "--model",
        choices=COURSE_MODELS,
        help="the notebooks' MODEL (sets COURSE_MODEL; default: COURSE_MODEL, else mistral-small-3.2)",
    )
    p.add_argument("--out", default="runs")
    p.add_argument("--notebooks", default=str(REPO_ROOT / "notebooks"))
    p.add_argument("--only", action="append", help="notebook name prefix, e.g. 01 (repeatable)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.add_argument("--keep-going", action="store_true", help="run later notebooks after a failure")
    p.set_defaults(func=run)

    p = sub.add_parser("checkpoint", help="run lessons 00 … N so a later lesson can start (skip-ahead)")
    p.add_argument("--upto", required=True, help="last lesson to run, e.g. 04")
    p.add_argument("--model", choices=COURSE_MODELS, help="default: COURSE_MODEL, else mistral-small-3.2")
    p.add_argument("--profile", default="auto")
    p.add_argument("--out", default="runs/checkpoint")
    p.add_argument("--notebooks", default=str(REPO_ROOT / "notebooks"))
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.set_defaults(func=checkpoint)

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
