"""Random-access data sources: LLaVA JSON/JSONL, ConcatSource, TFDS (array_record, no TF), SkipLog."""

import io
import json
import os
import pickle
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import json_index
from llava_jax.data.skips import SkipLog, error_kind
from llava_jax.data.sources import ConcatSource, LlavaJsonSource
from llava_jax.data.tfds_source import TfdsSource
from llava_jax.data.templates import render

SHARED = Path(__file__).resolve().parents[2] / "shared" / "llava_reference"


# ----------------------------------------------------------------------------- helpers


def write_rows(path: Path, rows, fmt: str, indent=None) -> Path:
    """Rows as a JSON list (``fmt="json"``) or one per line (``"jsonl"``). Strings in ``rows``
    are written verbatim (raw JSON text, for malformed lines)."""
    if fmt == "json":
        path.write_text(json.dumps(rows, indent=indent, ensure_ascii=False), encoding="utf-8")
    else:
        lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def conv(*texts):
    roles = ["human", "gpt"]
    return [{"from": roles[i % 2], "value": t} for i, t in enumerate(texts)]


GOOD_ROWS = [
    # stage-1 style, <image> before the text
    {"id": "a", "image": "00001/a.jpg", "conversations": conv("<image>\nDescribe the image.", "A cat.")},
    # <image> after the text
    {"id": "b", "image": "b.png", "conversations": conv("What is this?\n<image>", "A dog.")},
    # text-only, multi-turn, non-ASCII (byte offsets != char offsets)
    {"id": "c", "conversations": conv("Sag «café» 日本 😀", "ok ☕", "and?", "done")},
    # multi-turn with image; user/assistant roles in mixed case; integer id
    {"id": 7, "image": "/abs/x.jpg", "conversations": [
        {"from": "User", "value": "<image>\nQ1"}, {"from": "ASSISTANT", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]},
    # leading system turn, no id, image given as a one-element list
    {"image": ["d.jpg"], "conversations": [{"from": "system", "value": "Be brief."}] + conv(
        "<image>\nQ", "A")},
    # several images; a token/image count mismatch is the pipeline's check (after tokenization)
    {"id": "e", "image": ["e1.jpg", "e2.jpg"], "conversations": conv("<image><image>\nQ", "A")},
    {"id": "f", "image": "f.jpg", "conversations": conv("no token", "A")},
]


def expected_good(name, folder):
    j = lambda p: p if folder is None else os.path.join(folder, p)  # noqa: E731
    return [
        {"id": "a", "source": name, "row": 0, "image_path": j("00001/a.jpg"),
         "conversations": conv("<image>\nDescribe the image.", "A cat.")},
        {"id": "b", "source": name, "row": 1, "image_path": j("b.png"),
         "conversations": conv("What is this?\n<image>", "A dog.")},
        {"id": "c", "source": name, "row": 2, "image_path": None,
         "conversations": conv("Sag «café» 日本 😀", "ok ☕", "and?", "done")},
        {"id": "7", "source": name, "row": 3, "image_path": "/abs/x.jpg",
         "conversations": conv("<image>\nQ1", "A1", "Q2", "A2")},
        {"id": f"{name}:4", "source": name, "row": 4, "image_path": j("d.jpg"),
         "conversations": [{"from": "system", "value": "Be brief."}] + conv("<image>\nQ", "A")},
        {"id": "e", "source": name, "row": 5, "image_path": [j("e1.jpg"), j("e2.jpg")],
         "conversations": conv("<image><image>\nQ", "A")},
        {"id": "f", "source": name, "row": 6, "image_path": j("f.jpg"),
         "conversations": conv("no token", "A")},
    ]


# (row, expected error kind); JSON text strings are only used in JSONL files.
BAD_ROWS = [
    ('{"id": "x", "conversations": [', "bad_json"),
    ("not json at all", "bad_json"),
    ('{"id": "x"} trailing', "bad_json"),
    (["a", "list"], "not_a_dict"),
    (42, "not_a_dict"),
    ({"id": "m1", "image": "a.jpg"}, "no_conversations"),
    ({"id": "m2", "conversations": []}, "no_conversations"),
    ({"id": "m3", "conversations": "<image>\nhi"}, "no_conversations"),
    ({"id": "m4", "conversations": [{"from": "system", "value": "S"}]}, "no_conversations"),
    ({"id": "v1", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
     "bad_turn"),
    ({"id": "v2", "conversations": [{"from": "human", "value": None}]}, "bad_turn"),
    ({"id": "r1", "conversations": [{"from": "bot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
     "bad_turn"),
    ({"id": "r2", "conversations": [{"value": "hi"}]}, "bad_turn"),
    ({"id": "r3", "conversations": ["just a string"]}, "bad_turn"),
    ({"id": "r4", "conversations": conv("hi", "x") + [{"from": "system", "value": "late"}]}, "bad_turn"),
    ({"id": "i1", "image": 5, "conversations": conv("<image>\nq", "a")}, "bad_image_field"),
    ({"id": "i2", "image": "", "conversations": conv("<image>\nq", "a")}, "bad_image_field"),
    ({"id": "i3", "image": [], "conversations": conv("<image>\nq", "a")}, "bad_image_field"),
    ({"id": "i4", "image": ["a.jpg", None], "conversations": conv("<image>\nq", "a")},
     "bad_image_field"),
    ({"id": "i5", "image": {"path": "a.jpg"}, "conversations": conv("<image>\nq", "a")},
     "bad_image_field"),
]


def check_error_record(rec, kind, source, row):
    assert set(rec) >= {"id", "source", "row", "image_path", "conversations", "error"}
    assert error_kind(rec["error"]) == kind, rec["error"]
    assert rec["source"] == source and rec["row"] == row
    assert rec["conversations"] == [] and rec["image_path"] is None
    assert isinstance(rec["id"], str)


# ----------------------------------------------------------------------------- LLaVA JSON/JSONL


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
@pytest.mark.parametrize("folder", [None, "/data/images"])
def test_good_rows(tmp_path, fmt, folder):
    path = write_rows(tmp_path / f"mix.{fmt}", GOOD_ROWS, fmt, indent=1 if fmt == "json" else None)
    src = LlavaJsonSource(path, image_folder=folder)
    assert src.format == fmt and src.name == "mix" and len(src) == len(GOOD_ROWS)
    expected = expected_good("mix", folder)
    assert [src[i] for i in range(len(src))] == expected
    assert src[-1] == expected[-1] and src[np.int64(2)] == expected[2]
    for bad in (len(src), -len(src) - 1):
        with pytest.raises(IndexError):
            src[bad]
    # Every good record renders with the conversation templates (the pipeline's next step).
    r = render("vicuna_v1", src[1]["conversations"])
    assert "USER: <image>\nWhat is this? ASSISTANT: A dog.</s>" in r.text
    assert render("plain", src[0]["conversations"]).text == "<image>A cat.\n"


def test_format_detection_and_override(tmp_path):
    # A JSON list named .jsonl, JSONL named .json, an empty list, an empty file.
    a = write_rows(tmp_path / "a.jsonl", GOOD_ROWS[:2], "json")
    b = write_rows(tmp_path / "b.json", GOOD_ROWS[:2], "jsonl")
    assert LlavaJsonSource(a).format == "json" and LlavaJsonSource(b).format == "jsonl"
    assert LlavaJsonSource(a)[1] == LlavaJsonSource(b)[1] | {"source": "a"}
    (tmp_path / "e.json").write_text(" [ ] \n")
    (tmp_path / "f.jsonl").write_text("")
    assert len(LlavaJsonSource(tmp_path / "e.json")) == 0
    assert len(LlavaJsonSource(tmp_path / "f.jsonl")) == 0
    # BOM + CRLF line ends + blank / whitespace-only lines (not rows).
    text = "\r\n".join(["", json.dumps(GOOD_ROWS[0]), "   ", json.dumps(GOOD_ROWS[1]), "\t", ""])
    (tmp_path / "g.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    g = LlavaJsonSource(tmp_path / "g.jsonl", name="g")
    assert [g[0]["id"], g[1]["id"]] == ["a", "b"] and len(g) == 2
    assert g.where(1).endswith("g.jsonl line 4")
    (tmp_path / "h.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_ROWS).encode())
    assert [r["id"] for r in LlavaJsonSource(tmp_path / "h.json")] == ["a", "b", "c", "7", "h:4", "e", "f"]
    with pytest.raises(ValueError, match="format"):
        LlavaJsonSource(a, format="csv")
    with pytest.raises(FileNotFoundError):
        LlavaJsonSource(tmp_path / "missing.json")


def test_malformed_jsonl_rows_become_error_records(tmp_path):
    rows = [GOOD_ROWS[0]] + [r for r, _ in BAD_ROWS] + [GOOD_ROWS[2]]
    path = write_rows(tmp_path / "bad.jsonl", rows, "jsonl")
    with open(path, "ab") as f:  # invalid UTF-8 inside a string
        f.write(b'{"id": "u", "conversations": [{"from": "human", "value": "\xff\xfe"}]}\n')
    src = LlavaJsonSource(path, name="bad")
    assert len(src) == len(rows) + 1
    assert src[0]["id"] == "a" and "error" not in src[0]
    assert "error" not in src[len(rows) - 1]
    for k, (_, kind) in enumerate(BAD_ROWS, start=1):
        rec = src[k]
        check_error_record(rec, kind, "bad", k)
        assert f"bad.jsonl line {k + 1})" in rec["error"]  # names the file and line
    check_error_record(src[len(rows)], "bad_json", "bad", len(rows))
    # Ids are kept where the row had one.
    assert src[6]["id"] == "m1" and src[4]["id"] == ""


def test_malformed_json_list_rows_become_error_records(tmp_path):
    rows = [GOOD_ROWS[0]] + [r for r, _ in BAD_ROWS if not isinstance(r, str)] + [None, "str"]
    kinds = [k for r, k in BAD_ROWS if not isinstance(r, str)] + ["not_a_dict", "not_a_dict"]
    src = LlavaJsonSource(write_rows(tmp_path / "bad.json", rows, "json", indent=2))
    assert len(src) == len(rows)
    for k, kind in enumerate(kinds, start=1):
        check_error_record(src[k], kind, "bad", k)
        assert f"bad.json row {k} (byte " in src[k]["error"]


@pytest.mark.parametrize("text, match", [
    ('[{"id": 1}, {"id": 2', "unexpected end of file|Expecting"),
    ('[{"id": 1} {"id": 2}]', "expected ',' or ']'"),
    ('[{"id": 1}, ]', "Expecting value"),
    ('[{"id": 1}] [', "extra data"),
    ('[{"id": 1, }]', "property name"),
])
def test_invalid_json_list_raises_at_construction(tmp_path, text, match):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        LlavaJsonSource(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_index_window_boundaries(tmp_path, monkeypatch, chunk):
    """Tiny read windows: every element boundary, number, escape and multi-byte char falls
    across a window edge somewhere; the spans must still be exact."""
    monkeypatch.setattr(json_index, "_CHUNK", chunk)
    rows = GOOD_ROWS + [12345, -1.5e3, "s\"\\\u00e9", None, True, [1, [2]], {"id": "z"}]
    for fmt, indent in (("json", None), ("json", 2), ("jsonl", None)):
        path = tmp_path / f"w{indent}.{fmt}"
        if fmt == "json":
            write_rows(path, rows, fmt, indent=indent)
        else:
            write_rows(path, [json.dumps(r) for r in rows], fmt)
        src = LlavaJsonSource(path)
        assert len(src) == len(rows)
        raw = path.read_bytes()
        for i, row in enumerate(rows):
            span = raw[src._starts[i]: src._starts[i] + src._lengths[i]]
            assert json.loads(span) == row
        assert [src[i] for i in range(len(GOOD_ROWS))] == expected_good(path.stem, None)


def test_pickle_round_trip_and_changed_file(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "p.json", GOOD_ROWS, "json")
    src = LlavaJsonSource(path, image_folder="/imgs", name="p")
    before = [src[i] for i in range(len(src))]  # opens the file
    blob = pickle.dumps(src)
    assert len(blob) < 2000  # the index travels, no rows, no open file
    # Unpickling must not index again.
    monkeypatch.setattr(json_index, "_index_json_list", lambda p: pytest.fail("re-indexed"))
    clone = pickle.loads(blob)
    assert clone._fd is None
    assert [clone[i] for i in range(len(clone))] == before
    clone.close()
    # Rewriting the file after indexing is caught when a process opens it.
    fresh = pickle.loads(blob)
    time.sleep(0.01)
    write_rows(path, GOOD_ROWS[::-1], "json")
    with pytest.raises(RuntimeError, match="changed since it was indexed"):
        fresh[0]


def test_concat_source(tmp_path):
    a = LlavaJsonSource(write_rows(tmp_path / "llava.json", GOOD_ROWS[:5], "json"))
    b = LlavaJsonSource(write_rows(tmp_path / "ocr.jsonl", GOOD_ROWS[:2] + ["{bad"], "jsonl"),
                        name="ocr_vqa")
    c = LlavaJsonSource(write_rows(tmp_path / "empty.json", [], "json"))
    mix = ConcatSource([a, c, b])
    assert len(mix) == 8 and mix.offsets == [0, 5, 5, 8]
    got = [(r["source"], r["row"], r["id"]) for r in (mix[i] for i in range(len(mix)))]
    assert got == [("llava", 0, "a"), ("llava", 1, "b"), ("llava", 2, "c"), ("llava", 3, "7"),
                   ("llava", 4, "llava:4"), ("ocr_vqa", 0, "a"), ("ocr_vqa", 1, "b"),
                   ("ocr_vqa", 2, "")]
    assert error_kind(mix[7]["error"]) == "bad_json" and mix[-1] == mix[7]
    assert mix.locate(5) == (2, 0) and mix.locate(np.int32(4)) == (0, 4)
    with pytest.raises(IndexError):
        mix[8]
    clone = pickle.loads(pickle.dumps(mix))
    assert [clone[i] for i in range(8)] == [mix[i] for i in range(8)]
    with pytest.raises(ValueError):
        ConcatSource([])


def test_synthetic_stage_files_are_clean(tmp_path):
    from llava_jax.demo.dataset import generate

    generate(tmp_path, num_train=12, num_eval=2, seed=3)
    for stage, template in (("stage1", "plain"), ("stage2", "vicuna_v1")):
        src = LlavaJsonSource(tmp_path / f"{stage}.json", image_folder=tmp_path / "images")
        assert len(src) >= 12
        for rec in src:
            assert "error" not in rec, rec
            if rec["image_path"] is not None:
                assert os.path.isfile(rec["image_path"])
            render(template, rec["conversations"])


def test_reference_file_with_another_schema():
    """coco2014_val_gpt4_qa_30x3.jsonl has instruction/output rows, not conversations: every row
    must come back as an error record (counted and skipped), never an exception."""
    path = SHARED / "coco2014_val_gpt4_qa_30x3.jsonl"
    if not path.is_file():
        pytest.skip(f"reference data not found at {path} (only present next to the project)")
    src = LlavaJsonSource(path, image_folder="/coco/val2014")
    assert len(src) == 90
    log = SkipLog()
    for rec in src:
        assert error_kind(rec["error"]) == "no_conversations"
        assert rec["id"].isdigit() and rec["source"] == "coco2014_val_gpt4_qa_30x3"
        log.record_error(rec)
    assert log.summary()["by_kind"] == {"no_conversations": 90}


def test_memory_per_row(tmp_path, capsys):
    """100K stage-2-like rows in a JSON list: the index keeps 12 bytes per row."""
    n = 100_000
    rows = []
    for i in range(n):
        r = {"id": f"{i:09d}", "conversations": conv(
            "<image>\nWhat color is the circle in the picture?", "The circle is red.",
            "How many shapes are there?", "There are three shapes.")}
        if i % 10:
            r["image"] = f"coco/train2017/{i:012d}.jpg"
        rows.append(r)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows))
    del rows
    size = path.stat().st_size
    tracemalloc.start()
    t0 = time.perf_counter()
    src = LlavaJsonSource(path, image_folder="/data")
    seconds = time.perf_counter() - t0
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(src) == n and src.index_nbytes == 12 * n
    assert retained < 20 * n  # index + a few small objects
    assert peak < 4 * json_index._CHUNK + 24 * n  # a window (bytes, str, concat) + offsets
    assert src[n - 1]["id"] == f"{n - 1:09d}" and src[0]["image_path"] is None
    with capsys.disabled():
        print(f"\n[memory] {n} rows, {size / 2**20:.1f} MiB JSON: index {src.index_nbytes / n:.1f} "
              f"B/row, retained {retained / n:.1f} B/row, indexing peak {peak / 2**20:.1f} MiB, "
              f"{seconds:.2f} s under tracemalloc")


# ----------------------------------------------------------------------------- TFDS


def png_bytes(arr) -> bytes:
    bio = io.BytesIO()
    Image.fromarray(arr).save(bio, format="PNG")
    return bio.getvalue()


def tiny_image(i: int) -> np.ndarray:
    return np.full((6 + i, 9, 3), (10 * i, 255 - 10 * i, 7), np.uint8)


CAPTIONS = ["a red square", "two blue circles", "", "ünïcödé caption", "a cat <image>", "last one"]


def build_tfds(data_dir: Path, name: str, features_fn, example_fn, n: int):
    """Prepare a tiny TFDS data set in array_record format, offline and without TensorFlow.

    Without TF, TFDS cannot encode numpy images (it uses tf.image.encode_png), so examples give
    the image as PNG bytes, which TFDS stores as is. ``DatasetInfo`` is built directly: the
    ``dataset_info_from_configs`` helper looks for metadata files next to the builder's module.
    The class is created under ``skip_registration`` so the global TFDS registry stays clean
    and reading by name goes through the prepared files."""
    import tensorflow_datasets as tfds

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=features_fn())

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(n):
            yield i, example_fn(i)

    body = {"name": name, "VERSION": tfds.core.Version("1.0.0"), "_info": _info,
            "_split_generators": _split_generators, "_generate_examples": _generate_examples}
    with tfds.core.registered.skip_registration():
        cls = type("TinyBuilder", (tfds.core.GeneratorBasedBuilder,), body)
    builder = cls(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


@pytest.fixture(scope="module")
def tfds_data(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")
    n = len(CAPTIONS)
    simple = build_tfds(
        data_dir, "llava_test_captions",
        lambda: tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "key": np.int64,
        }),
        lambda i: {"image": png_bytes(tiny_image(i)), "caption": CAPTIONS[i], "key": 100 + i},
        n,
    )
    multi = build_tfds(
        data_dir, "llava_test_multi",
        lambda: tfds.features.FeaturesDict({
            "photo": tfds.features.Image(shape=(None, None, 3)),
            "thumb": tfds.features.Image(shape=(None, None, 3)),
            "title": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "meta": tfds.features.FeaturesDict({"uid": tfds.features.Text()}),
        }),
        lambda i: {"photo": png_bytes(tiny_image(i)), "thumb": png_bytes(tiny_image(0)),
                   "title": f"title {i}", "captions": ["", f"first {i}", f"second {i}"],
                   "meta": {"uid": f"u{i}"}},
        3,
    )
    return data_dir, simple, multi


def test_tfds_source_reads_array_record_without_tensorflow(tfds_data):
    data_dir, simple, _ = tfds_data
    src = TfdsSource(simple.data_dir, "train")
    assert (src.image_key, src.text_key, src.name, len(src)) == ("image", "caption",
                                                                 "llava_test_captions", 6)
    by_caption = {}
    for i in range(len(src)):
        rec = src[i]
        assert rec["source"] == "llava_test_captions" and rec["row"] == i
        assert rec["id"] == f"llava_test_captions/train/{i}" and rec["image_path"] is None
        if "error" in rec:
            by_caption[error_kind(rec["error"])] = rec
            continue
        assert isinstance(rec["image_bytes"], bytes) and rec["image_bytes"][:4] == b"\x89PNG"
        human, gpt = rec["conversations"]
        assert human == {"from": "human", "value": "<image>\nDescribe the image concisely."}
        assert gpt["from"] == "gpt"
        k = CAPTIONS.index(gpt["value"])  # TFDS shuffles rows: find the example back
        decoded = np.asarray(Image.open(io.BytesIO(rec["image_bytes"])))
        np.testing.assert_array_equal(decoded, tiny_image(k))
        assert render("plain", rec["conversations"]).text == f"<image>{CAPTIONS[k]}\n"
        by_caption[gpt["value"]] = rec
    # Empty caption and <image> inside a caption are error records, not exceptions.
    assert set(by_caption) == {"a red square", "two blue circles", "ünïcödé caption", "last one",
                               "bad_caption"}
    errors = [src[i] for i in range(len(src)) if "error" in src[i]]
    assert len(errors) == 2 and all(e["image_bytes"] is None for e in errors)
    assert str(simple.data_dir) in errors[0]["error"]
    assert "tensorflow" not in sys.modules  # not installed here; where it is, still not needed


def test_tfds_source_by_name_split_ids_instructions_pickle(tfds_data):
    data_dir, simple, _ = tfds_data
    a = TfdsSource(simple.data_dir, "train")
    b = TfdsSource("llava_test_captions", "train[:4]", data_dir=data_dir, name="cc",
                   id_key="key", instruction=["I0", "I1", "I2"])
    assert b.builder_dir == a.builder_dir and len(b) == 4
    for i in range(4):
        ra, rb = a[i], b[i]
        if "error" in ra:
            assert error_kind(rb["error"]) == error_kind(ra["error"])
            continue
        assert rb["source"] == "cc" and rb["image_bytes"] == ra["image_bytes"]
        assert rb["conversations"][1] == ra["conversations"][1]
        assert rb["conversations"][0]["value"] == "<image>\n" + b.instruction_for(i)
        assert rb["conversations"][0]["value"] in {f"<image>\nI{k}" for k in range(3)}
        assert int(rb["id"]) == 100 + CAPTIONS.index(rb["conversations"][1]["value"])
    assert len({b.instruction_for(i) for i in range(30)}) == 3  # the choice varies with the row
    blob = pickle.dumps(b)
    assert len(blob) < 4000
    clone = pickle.loads(blob)
    assert clone._ds is None and [clone[i] for i in range(4)] == [b[i] for i in range(4)]
    with pytest.raises(IndexError):
        b[4]
    with pytest.raises(ValueError, match="cannot open split 'validation'"):
        TfdsSource(simple.data_dir, "validation")
    with pytest.raises(ValueError, match="cannot find the TFDS data set"):
        TfdsSource("llava_test_nothing_here", "train", data_dir=data_dir)


def test_tfds_feature_detection(tfds_data):
    _, _, multi = tfds_data
    with pytest.raises(ValueError, match=r"several Image features \['photo', 'thumb'\]") as e:
        TfdsSource(multi.data_dir, "train")
    assert "captions: Text (in a Sequence)" in str(e.value)  # lists every feature
    with pytest.raises(ValueError, match="several Text features"):
        TfdsSource(multi.data_dir, "train", image_key="photo")
    with pytest.raises(ValueError, match="not a Image"):
        TfdsSource(multi.data_dir, "train", image_key="title", text_key="title")
    with pytest.raises(ValueError, match="no feature 'nope'"):
        TfdsSource(multi.data_dir, "train", image_key="photo", text_key="nope")
    # A Sequence of captions gives its first non-empty one; nested keys use "/".
    src = TfdsSource(multi.data_dir, "train", image_key="photo", text_key="captions",
                     id_key="meta/uid")
    for i in range(len(src)):
        rec = src[i]
        k = int(rec["id"][1:])
        assert rec["conversations"][1]["value"] == f"first {k}"
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rec["image_bytes"]))),
                                      tiny_image(k))
    src2 = TfdsSource(multi.data_dir, "train", image_key="thumb", text_key="meta/uid")
    assert {src2[i]["conversations"][1]["value"] for i in range(3)} == {"u0", "u1", "u2"}


# ----------------------------------------------------------------------------- SkipLog


def test_skip_log(tmp_path):
    path = tmp_path / "skipped.jsonl"
    log = SkipLog(path, max_examples=2)
    assert str(log) == "skipped 0 rows" and log.total == 0
    log.record("mix", 3, "a", "bad_json: Expecting value (f.jsonl line 4)")
    log.record("mix", 5, "b", "bad_turn: turn 0: unknown role 'bot'")
    log.record("ocr", 1, "c", "bad_json: x")
    log.record("ocr", 2, "d", "bad_json: y")
    log.record_error({"source": "ocr", "row": 9, "id": "e", "error": "image unreadable"})
    s = log.summary()
    assert s["total"] == 5
    assert s["by_kind"] == {"bad_json": 3, "bad_turn": 1, "image unreadable": 1}
    assert s["by_source"] == {"ocr": 3, "mix": 2}
    assert [e["row"] for e in s["examples"]["bad_json"]] == [3, 1]  # capped at max_examples
    assert str(log) == ("skipped 5 rows: bad_json 3, bad_turn 1, image unreadable 1 "
                        "(by source: ocr 3, mix 2)")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 5
    assert {k: lines[1][k] for k in ("source", "row", "id", "kind")} == {
        "source": "mix", "row": 5, "id": "b", "kind": "bad_turn"}
    assert lines[1]["reason"] == "bad_turn: turn 0: unknown role 'bot'"
    # Threads: no lost counts; pickling drops the lock and keeps the counts.
    log2 = SkipLog()
    threads = [threading.Thread(target=lambda: [log2.record("s", i, "", "k: r") for i in range(500)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log2.summary()["by_kind"] == {"k": 2000}
    clone = pickle.loads(pickle.dumps(log2))
    clone.record("s", 0, "", "k: again")
    assert clone.total == 2001 and log2.total == 2000
