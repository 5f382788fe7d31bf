import hashlib
import json
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

from course_utils.receipts import (
    RECEIPT_SCHEMA,
    SPLITS,
    as_text_record,
    cord_to_target,
    generate_dataset,
    load_local,
    load_receipts,
    read_jsonl,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "receipts"


def digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def test_generator_is_byte_identical_for_a_seed(tmp_path):
    small = {"train": 6, "val": 2, "test": 2}
    generate_dataset(tmp_path / "a", seed=7, splits=small)
    generate_dataset(tmp_path / "b", seed=7, splits=small)
    generate_dataset(tmp_path / "c", seed=8, splits=small)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_shipped_data_is_what_the_generator_makes(tmp_path):
    """data/receipts is exactly `generate_dataset(seed=0)` — nobody edited it by hand."""
    generate_dataset(tmp_path, seed=0)
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DATA / f"{split}.jsonl").read_bytes()
    for name in ("train-0000.png", "val-0099.png", "test-0042.png"):
        assert (tmp_path / "images" / name).read_bytes() == (DATA / "images" / name).read_bytes()


def test_generator_refuses_to_overwrite(tmp_path):
    generate_dataset(tmp_path, splits={"train": 1})
    with pytest.raises(FileExistsError, match="force"):
        generate_dataset(tmp_path, splits={"train": 1})


def test_every_shipped_record_validates_and_its_image_opens():
    total_bytes = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert total_bytes <= 25 * 1024**2
    ids, documents = set(), set()
    for split, n in SPLITS.items():
        rows = load_local(split, DATA)
        assert len(rows) == n
        for row in rows:
            jsonschema.validate(row["target"], RECEIPT_SCHEMA)
            assert json.loads(row["messages"][-1]["content"]) == row["target"]
            t = row["target"]
            assert abs(t["subtotal"] + t["tax"] - t["total"]) < 0.011
            with Image.open(row["images"][0]) as image:
                image.verify()
            assert row["id"] not in ids
            ids.add(row["id"])
            documents.add(row["text"])
    assert len(documents) == sum(SPLITS.values())  # no duplicate documents across splits


def test_text_variant_puts_the_document_in_the_prompt():
    row = read_jsonl(DATA / "val.jsonl")[0]
    text_row = as_text_record(row)
    assert text_row["images"] == [] and row["text"] in text_row["messages"][1]["content"]
    assert text_row["messages"][-1] == row["messages"][-1]


def test_cord_ground_truth_maps_to_the_course_schema():
    gt = {
        "gt_parse": {
            "menu": [
                {"nm": "Nasi Goreng", "cnt": "2", "price": "50,000"},
                {"nm": "Es Teh", "cnt": "1", "price": "8,000"},
            ],
            "sub_total": {"subtotal_price": "58,000", "tax_price": "5,800"},
            "total": {"total_price": "63,800"},
        }
    }
    target = cord_to_target(json.dumps(gt))
    jsonschema.validate(target, RECEIPT_SCHEMA)
    assert target["items"][0] == {"name": "Nasi Goreng", "qty": 2, "unit_price": 25000.0}
    assert (target["subtotal"], target["tax"], target["total"], target["currency"]) == (
        58000,
        5800,
        63800,
        "IDR",
    )


def test_offline_load_falls_back_to_local_and_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows, message = load_receipts("test", limit=3)
    assert len(rows) == 3 and "local course dataset" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(RuntimeError, match="CORD-v2"):
        load_receipts("test", source="cord")


def test_generating_refuses_to_overwrite_any_existing_split(tmp_path):
    from course_utils.receipts import generate_dataset

    (tmp_path / "val.jsonl").write_text("keep me\n")
    with pytest.raises(FileExistsError, match="val.jsonl"):
        generate_dataset(tmp_path, splits={"val": 1})
    assert (tmp_path / "val.jsonl").read_text() == "keep me\n"


def test_reading_a_split_names_the_file_and_line_of_a_broken_row(tmp_path):
    from course_utils.receipts import read_jsonl

    path = tmp_path / "train.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": 1}\n{"id": 2\n')  # a BOM (read) and a cut-off second line
    with pytest.raises(ValueError, match=r"train.jsonl.*line 2"):
        read_jsonl(path)
