"""Reading the files people really bring: JSON arrays, objects of arrays, gzip, Parquet, Hugging Face
datasets, and encodings other than UTF-8 — row reports say ``file:row:field: reason`` in every one."""

import codecs
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from course_utils.cli import main
from course_utils.data import (
    DataFormatError,
    DataReadError,
    Issue,
    from_hf_dataset,
    read_rows,
    record_key,
    split_records,
    validate_dataset,
    validate_file,
    write_jsonl,
)

FIXTURES = Path(__file__).resolve().parent.parent / "data" / "examples"  # shipped: lesson 03 shows them
OK = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
ACCENTED = {
    "messages": [{"role": "user", "content": "Café crème?"}, {"role": "assistant", "content": "Oui, été."}]
}
ACCENTED_2 = {"messages": [{"role": "user", "content": "Où?"}, {"role": "assistant", "content": "À Zürich."}]}
BAD_ROLE = {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}


def rows(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(n)
    ]


def jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


# --- containers ---------------------------------------------------------------------------------


def test_a_json_array_of_n_valid_rows_is_n_valid_rows_and_exit_0(tmp_path, capsys):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows(5), indent=2))
    report = validate_file(path)
    assert (report.total, len(report.valid), report.ok) == (5, 5, True)
    assert report.valid_rows == [0, 1, 2, 3, 4] and report.container == "JSON array"
    assert main(["data", "validate", str(path)]) == 0
    assert "5 rows, 5 valid" in capsys.readouterr().out


def test_a_bad_element_of_a_json_array_is_named_by_its_index(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([OK, rows(1)[0], BAD_ROLE]))
    report = validate_file(path)
    assert [str(i) for i in report.issues] == [
        f"{path}:2:messages[0].role: unknown role 'bot'; use system, user, assistant or tool"
    ]
    assert "rows are 0-based indexes" in report.summary()


def test_an_object_of_arrays_names_the_array_and_the_index(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": [OK, rows(1)[0]], "test": [rows(2)[1], BAD_ROLE]}))
    assert read_rows(path).container == "JSON object of arrays"
    report = validate_file(path)
    assert report.valid_rows == ["train[0]", "train[1]", "test[0]"]
    assert str(report.issues[0]).startswith(f"{path}:test[1]:messages[0].role: unknown role 'bot'")


def test_columns_become_rows(tmp_path):
    path = tmp_path / "columns.json"
    path.write_text(json.dumps({"instruction": ["a", "b"], "input": ["", "x"], "output": ["1", "2"]}))
    report = validate_file(path)
    assert report.ok and [r["messages"][0]["content"] for r in report.valid] == ["a", "b\n\nx"]


def test_json_lines_named_json_are_read_as_lines_with_a_note(tmp_path):
    path = tmp_path / "lines.json"
    path.write_bytes(jsonl_bytes([OK, rows(1)[0]]))
    report = validate_file(path)
    assert report.ok and report.valid_rows == [1, 2]
    assert any("read as JSON Lines" in note for note in report.notes)


def test_a_json_array_named_jsonl_is_read_as_an_array_with_a_note(tmp_path):
    path = tmp_path / "export.jsonl"
    path.write_text(json.dumps(rows(3), indent=2))
    report = validate_file(path)
    assert report.ok and report.valid_rows == [0, 1, 2]
    assert report.notes == [f"{path}: named .jsonl but holds a JSON array"]


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.json.gz"])
def test_gzip_files_validate_like_the_plain_ones(tmp_path, name):
    content = (
        jsonl_bytes(rows(3) + [BAD_ROLE]) if "jsonl" in name else json.dumps(rows(3) + [BAD_ROLE]).encode()
    )
    path = tmp_path / name
    path.write_bytes(gzip.compress(content))
    report = validate_file(path)
    assert len(report.valid) == 3 and report.container.endswith("+ gzip")
    assert report.invalid_rows == ([4] if "jsonl" in name else [3])


def test_a_corrupt_gzip_or_a_fake_one_is_one_clear_error(tmp_path):
    broken = tmp_path / "d.jsonl.gz"
    broken.write_bytes(gzip.compress(jsonl_bytes(rows(50)))[:40])
    with pytest.raises(DataReadError, match="gzip file that cannot be decompressed"):
        validate_file(broken)
    fake = tmp_path / "e.jsonl.gz"
    fake.write_bytes(jsonl_bytes(rows(1)))
    with pytest.raises(DataReadError, match="not gzip-compressed"):
        validate_file(fake)


def test_parquet_rows_validate_and_are_named_by_index(tmp_path):
    path = write_parquet(tmp_path / "train-00000-of-00001.parquet", rows(3) + [BAD_ROLE])
    report = validate_file(path)
    assert len(report.valid) == 3 and report.container == "Parquet"
    assert str(report.issues[0]).startswith(f"{path}:3:messages[0].role:")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataReadError, match="not a readable Parquet file"):
        validate_file(broken)


def test_parquet_fills_missing_keys_with_null_and_that_is_not_a_problem(tmp_path):
    mixed = [
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "weight": 0},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "b"},
            ]
        },
        OK,
    ]
    report = validate_file(write_parquet(tmp_path / "w.parquet", mixed))
    assert report.ok and report.notes == []
    assert report.valid[0]["messages"][2] == {"role": "user", "content": "q2"}  # no weight: None invented
    assert report.valid[0]["messages"][1]["weight"] == 0


# --- encodings ----------------------------------------------------------------------------------


def test_utf8_with_a_bom_is_read_in_every_container(tmp_path):
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(codecs.BOM_UTF8 + jsonl_bytes([ACCENTED, OK]))
    array = tmp_path / "bom.json"
    array.write_bytes(codecs.BOM_UTF8 + json.dumps([ACCENTED]).encode())
    assert validate_file(lines).ok and len(validate_file(lines).valid) == 2
    report = validate_file(array)
    assert report.ok and report.valid[0]["messages"][0]["content"] == "Café crème?"


def test_a_cp1252_file_is_one_line_naming_place_encoding_and_fix(tmp_path):
    path = tmp_path / "excel.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [OK, ACCENTED, ACCENTED_2])
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(DataReadError) as caught:
        validate_file(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: line 2 (byte offset ")
    assert "cp1252" in message and "--encoding cp1252" in message and "iconv -f CP1252 -t UTF-8" in message
    offset = int(message.split("byte offset ")[1].split(")")[0])
    assert path.read_bytes()[offset : offset + 1] == "é".encode("cp1252")  # the offset points at the byte
    report = validate_file(path, encoding="cp1252")
    assert report.ok and report.valid[1]["messages"][0]["content"] == "Café crème?"


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le"])
def test_utf16_files_are_named_and_readable_with_the_encoding(tmp_path, codec):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(jsonl_bytes([ACCENTED, OK]).decode().encode(codec))
    with pytest.raises(DataReadError, match="utf-16"):
        validate_file(path)
    assert validate_file(path, encoding=codec).ok


def test_one_undecodable_row_is_named_and_the_others_are_kept(tmp_path):
    path = tmp_path / "mostly.jsonl"
    good = jsonl_bytes([ACCENTED, OK])
    bad = json.dumps(rows(1)[0]).encode().replace(b"q0", b"q\xff0") + b"\n"
    path.write_bytes(good + bad)
    report = validate_file(path)
    assert report.valid_rows == [1, 2] and len(report.issues) == 1
    issue = report.issues[0]
    assert (issue.row, issue.field) == (3, "(encoding)") and "not UTF-8" in issue.reason
    offset = len(good) + bad.index(b"\xff")
    assert f"byte offset {offset}" in issue.reason


def test_empty_files_are_an_error_not_a_success(tmp_path, capsys):
    for name, content in [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n\n"), ("empty.json", b"[]")]:
        path = tmp_path / name
        path.write_bytes(content)
        report = validate_file(path)
        assert not report.ok and report.total == 0 and "no rows" in str(report.issues[0])
        assert main(["data", "validate", str(path)]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_csv_or_broken_json_array_is_one_clear_error(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("instruction,output\nhi,hello\n")
    with pytest.raises(DataReadError, match="does not start like JSON"):
        validate_file(csv)
    broken = tmp_path / "d.json"
    broken.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataReadError, match=r"not valid JSON at line 3, column 23"):
        validate_file(broken)


# --- no traceback, whatever the input -----------------------------------------------------------


def every_kind_of_file(folder: Path) -> list[Path]:
    mixed = [OK, ACCENTED, BAD_ROLE]
    files = {
        "a.jsonl": jsonl_bytes(mixed),
        "b.json": json.dumps(mixed).encode(),
        "c.json": json.dumps({"train": mixed}).encode(),
        "d.jsonl.gz": gzip.compress(jsonl_bytes(mixed)),
        "e.json.gz": gzip.compress(json.dumps(mixed).encode()),
        "f.jsonl": codecs.BOM_UTF8 + jsonl_bytes(mixed),
        "g.jsonl": jsonl_bytes(mixed).decode().encode("utf-16"),
        "h.jsonl": jsonl_bytes(mixed + [ACCENTED_2]).decode().encode("cp1252"),
        "i.json": json.dumps(mixed, ensure_ascii=False).encode("cp1252"),
        "j.jsonl": b"",
        "k.json": b"{not json",
        "l.jsonl.gz": b"\x1f\x8b garbage",
        "m.parquet": b"PAR1 garbage",
        "n.json": b'"just a string"',
        "o.jsonl": b"[1, 2]\n3\n",
    }
    paths = []
    for name, content in files.items():
        (folder / name).write_bytes(content)
        paths.append(folder / name)
    paths.append(write_parquet(folder / "p.parquet", mixed))
    return paths


def test_no_input_file_of_any_kind_produces_a_traceback(tmp_path, capsys):
    for path in every_kind_of_file(tmp_path):
        code = main(["data", "validate", str(path)])
        out, err = capsys.readouterr()
        assert code in (1, 2), (path.name, code)
        assert str(path) in out + err, path.name  # every report names the file
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (path.name, err)


def test_the_cli_reports_cp1252_in_one_line_and_reads_it_with_encoding(tmp_path):
    path = tmp_path / "excel.jsonl"
    path.write_bytes(jsonl_bytes([ACCENTED, ACCENTED_2]).decode().encode("cp1252"))
    command = [sys.executable, "-m", "course_utils", "data", "validate", str(path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "--encoding cp1252" in run.stderr
    fixed = subprocess.run(command + ["--encoding", "cp1252"], capture_output=True, text=True, timeout=120)
    assert fixed.returncode == 0 and "2 rows, 2 valid" in fixed.stdout


# --- rows that used to crash ----------------------------------------------------------------------


def test_the_two_crashing_rows_are_row_numbered_reports(tmp_path, capsys):
    no_url = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"detail": "low"}},
                ],
            },
            {"role": "assistant", "content": "A cat."},
        ]
    }
    number = {"conversations": [{"from": "human", "value": "6*7?"}, {"from": "gpt", "value": 42}]}
    path = tmp_path / "crash.jsonl"
    path.write_bytes(jsonl_bytes([no_url, number, OK]))
    assert main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:1:messages[0].content[1].image_url.url: missing" in out
    assert f"{path}:2:conversations[1].value: must be a string, got int" in out
    assert "3 rows, 1 valid, 2 invalid" in out


# --- Hugging Face datasets and images in memory ---------------------------------------------------


def test_from_hf_dataset_reports_every_bad_row_by_index_and_keeps_going():
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}])
    issues: list[Issue] = []
    conversations = Dataset.from_list(
        [
            {"conversations": [{"from": "robot", "value": "x"}]},
            *[{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}] * 2,
        ]
    )
    records = from_hf_dataset(DatasetDict(train=ds, test=conversations), issues=issues)
    assert len(records) == 4
    assert [str(i) for i in issues] == ["dataset:test[0]:conversations[0].from: unknown speaker 'robot'"]
    with pytest.raises(DataFormatError, match=r"1 row\(s\) could not be converted: dataset:0:conversations"):
        from_hf_dataset(conversations)


def test_a_hf_dataset_validates_with_index_rows():
    from datasets import Dataset

    report = validate_dataset(Dataset.from_list([OK, BAD_ROLE, rows(1)[0]]), name="hub:org/set")
    assert report.valid_rows == [0, 2] and str(report.issues[0]).startswith("hub:org/set:1:messages[0].role")


def image_row(image) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "red"},
        ],
        "images": [image],
    }


def test_images_in_memory_have_a_pixel_key_and_are_written_as_data_uris(tmp_path):
    red_a, red_b = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "red")
    blue = Image.new("RGB", (8, 8), "blue")
    assert record_key(image_row(red_a)) == record_key(image_row(red_b))  # same pixels, other objects
    assert record_key(image_row(red_a)) != record_key(image_row(blue))
    records = [image_row(Image.new("RGB", (8, 8), (i, 0, 0))) for i in range(30)]
    first, _ = split_records(records, seed=0)
    again, _ = split_records([image_row(r["images"][0].copy()) for r in records], seed=0)
    assert [record_key(r) for r in first["test"]] == [record_key(r) for r in again["test"]]
    out = write_jsonl([image_row(red_a)], tmp_path / "out.jsonl")
    written = json.loads(out.read_text())
    assert written["images"][0].startswith("data:image/png;base64,")
    from course_utils.chat import load_image

    assert validate_file(out).ok and load_image(written["images"][0]).getpixel((0, 0)) == (255, 0, 0)


def test_hf_image_columns_validate_dedupe_and_write(tmp_path):
    import io

    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    features = Features(
        {"image": ImageFeature(), "conversations": [{"from": Value("string"), "value": Value("string")}]}
    )
    turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    ds = Dataset.from_dict(
        {
            "image": [{"bytes": png("red"), "path": None}] * 2 + [{"bytes": png("blue"), "path": None}],
            "conversations": [turns] * 3,
        },
        features=features,
    )
    report = validate_dataset(ds)
    assert report.valid_rows == [0, 2] and "exact duplicate of row 0" in str(report.issues[0])
    out = write_jsonl(report.valid, tmp_path / "llava.jsonl")
    assert validate_file(out).ok and len(validate_file(out).valid) == 2


def test_fixture_files_of_every_container_validate():
    for path in sorted(p for p in FIXTURES.iterdir() if p.suffix != ".md"):
        report = validate_file(path)
        assert report.total > 0, path.name
        for issue in report.issues:
            assert str(issue).startswith(f"{path}:"), issue


# --- review findings (2026-11-30): each reproduced first ------------------------------------------


def test_json_nested_past_the_parsers_depth_is_a_clear_error_and_json_lines_keep_their_rows(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    whole = tmp_path / "deep.json"
    whole.write_text(deep)
    with pytest.raises(DataReadError, match="deep.json.*nested"):
        read_rows(whole)
    lines = tmp_path / "deep.jsonl"
    lines.write_text(deep + "\n" + json.dumps(OK) + "\n")
    report = validate_file(lines)
    assert len(report.valid) == 1 and any("deep.jsonl:1" in str(issue) for issue in report.issues)


def test_a_trailing_newline_does_not_make_a_tool_call_id_or_name_valid():
    from course_utils.data import check_tool_calls

    def row(call_id: str, name: str) -> dict:
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}
        return {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call_id, "content": "1"},
                {"role": "assistant", "content": "a"},
            ],
            "tools": [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}],
        }

    assert check_tool_calls(row("abcdefghi", "f")) == []
    assert any(
        "abcdefghi\n" in message or "id" in field
        for field, message in check_tool_calls(row("abcdefghi\n", "f"))
    )
    assert check_tool_calls(row("abcdefghi", "f\n")) != []


def test_write_valid_writes_json_lines_only_and_never_over_its_own_input(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(OK) + "\n" + json.dumps(BAD_ROLE) + "\n")
    assert main(["data", "validate", str(source), "--write-valid", str(tmp_path / "out.jsonl.gz")]) == 2
    assert not (tmp_path / "out.jsonl.gz").exists()
    assert main(["data", "validate", str(source), "--write-valid", str(source), "--overwrite"]) == 2
    assert len(source.read_text().splitlines()) == 2  # the invalid row is still there


def test_write_valid_with_no_valid_row_writes_no_file_and_says_so(tmp_path, capsys):
    from course_utils.data import save_splits

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(BAD_ROLE) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["data", "validate", str(source), "--write-valid", str(out)]) == 1  # invalid rows: 1, not 2
    assert not out.exists()  # no 0-byte file that the next lesson would train on
    captured = capsys.readouterr()
    assert f"{source}:1:messages[0].role" in captured.out  # the report still names the bad row
    assert f"no rows to write: nothing written to {out}" in captured.err and "wrote 0" not in captured.out
    out.write_text("kept\n")  # an existing output is not emptied either, even with --overwrite
    assert main(["data", "validate", str(source), "--write-valid", str(out), "--overwrite"]) == 1
    assert out.read_text() == "kept\n"
    with pytest.raises(ValueError, match="no rows to write"):
        write_jsonl([], tmp_path / "direct.jsonl")
    assert not (tmp_path / "direct.jsonl").exists()
    write_jsonl(iter(rows(2)), tmp_path / "gen.jsonl")  # an iterator is written whole after the check
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 2
    # a split left empty by a small dataset is still written (lesson 04 reads every split)
    assert save_splits({"train": rows(2), "val": []}, tmp_path / "splits")["val"] == "written"
    assert (tmp_path / "splits" / "val.jsonl").read_text() == ""


def test_write_valid_onto_an_existing_file_refuses_after_the_report(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(OK) + "\n" + json.dumps(BAD_ROLE) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text("earlier\n")
    assert main(["data", "validate", str(source), "--write-valid", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"{source}:2:messages[0].role" in captured.out  # which rows are bad is still shown …
    assert "2 rows, 1 valid, 1 invalid" in captured.out
    assert f"{out} exists" in captured.err and "--overwrite" in captured.err  # … and why nothing was written
    assert out.read_text() == "earlier\n"
    assert main(["data", "validate", str(source), "--write-valid", str(out), "--overwrite"]) == 1
    assert len(out.read_text().splitlines()) == 1  # replaced on request: the one valid row


def test_images_given_as_one_string_say_it_must_be_a_list(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({**OK, "images": "a.png"}) + "\n")
    report = validate_file(source)
    assert not report.valid and any("list" in str(issue) for issue in report.issues)
    assert not any("file not found: a" in str(issue) for issue in report.issues)


def test_plain_prompt_completion_rows_keep_their_tools():
    from course_utils.data import to_canonical

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    record = to_canonical({"prompt": "q", "completion": "a", "tools": tools})
    assert record["tools"] == tools  # were dropped without a note ("tools" counted as a known key)


def test_small_report_fixes(tmp_path):
    from course_utils.data import check_record, check_tool_calls

    with pytest.raises(FileNotFoundError, match="a folder"):
        read_rows(tmp_path)  # it said "no such file"
    bad_role = {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    assert any("tool" in message for _, message in check_record(bad_role))  # the roles a row may use
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "f", "arguments": '{"a": NaN}'}}
    row = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "abcdefghi", "content": "1"},
            {"role": "assistant", "content": "a"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    }
    assert any("arguments" in field for field, _ in check_tool_calls(row))  # NaN is not JSON


def test_keys_inside_content_parts_that_are_not_carried_over_are_reported():
    from course_utils.data import unknown_fields

    row = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "q", "cache_control": {"type": "ephemeral"}},
                    {"type": "image_url", "image_url": {"url": "a.png", "detail": "high"}},
                ],
            },
            {"role": "assistant", "content": "a"},
        ]
    }
    found = unknown_fields(row, "openai")
    assert "messages[].content[].cache_control" in found and "messages[].content[].image_url.detail" in found
    assert (
        unknown_fields({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}]}, "openai")
        == []
    )


def test_a_key_given_twice_in_a_row_is_a_row_problem_not_a_silent_choice(tmp_path):
    path = tmp_path / "dup.jsonl"
    first = json.dumps(OK["messages"])
    path.write_text('{"messages": ' + first + ', "messages": ' + first + "}\n" + json.dumps(OK) + "\n")
    report = validate_file(path)
    assert len(report.valid) == 1
    assert any(":1:" in str(issue) and "twice" in str(issue) for issue in report.issues)


def test_save_splits_writes_all_splits_or_none(tmp_path):
    from course_utils.data import save_splits

    (tmp_path / "val.jsonl").write_text(json.dumps(OK) + "\n")  # differs from the val about to be saved
    with pytest.raises(FileExistsError, match="val.jsonl"):
        save_splits({"train": rows(2), "val": rows(1)}, tmp_path)
    assert not (tmp_path / "train.jsonl").exists()  # no new train beside the old val
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.jsonl"]  # no candidates left behind
    assert save_splits({"train": rows(2), "val": rows(1)}, tmp_path, overwrite=True) == {
        "train": "written",
        "val": "replaced",
    }


def test_sharegpt_available_tools_are_carried_and_not_called_ignored():
    from course_utils.data import to_canonical, unknown_fields

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    row = {
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        "available_tools": tools,
    }
    assert to_canonical(row, "sharegpt")["tools"] == tools
    assert unknown_fields(row, "sharegpt") == []
