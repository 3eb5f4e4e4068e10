"""distillery.data readers: formats, folders, demo corpora, and a DistilleryError with file:line for bad input."""

import gzip
import json

import pytest

from distillery.config import DataConfig
from distillery.data import build_datasets, read_records, resolve_sources
from distillery.data.readers import read_source
from distillery.errors import DistilleryError
from tiny import tiny_tokenizer

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_text_file_is_one_document(tmp_path):
    (tmp_path / "a.txt").write_text("First line.\n\nSecond paragraph.\n")
    recs = list(read_records([str(tmp_path / "a.txt")], DataConfig()))
    assert [(r.text, r.where) for r in recs] == [("First line.\n\nSecond paragraph.\n", f"{tmp_path / 'a.txt'}:1")]


def test_folder_recursive_sorted_with_gz(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zed")
    (tmp_path / "a.rst").write_text("ay")
    with gzip.open(tmp_path / "b" / "c.txt.gz", "wt") as fh:
        fh.write("compressed")
    (tmp_path / "skip.py").write_text("print()")
    write_jsonl(tmp_path / "d.jsonl", [{"text": "json doc"}])
    srcs = resolve_sources([str(tmp_path)])
    assert [s.name.removeprefix(str(tmp_path) + "/") for s in srcs] == ["a.rst", "b/c.txt.gz", "b/z.md", "d.jsonl"]
    texts = [r.text for r in read_records([str(tmp_path)], DataConfig())]
    assert texts == ["ay", "compressed", "zed", "json doc"]
    assert [s.format for s in resolve_sources([str(tmp_path)], "text")] == ["text"] * 3  # forced: text files only


def test_jsonl_text_field_and_blank_lines(tmp_path):
    p = write_jsonl(tmp_path / "t.jsonl", [{"body": "one", "id": 1}, "", {"body": "two"}])
    with gzip.open(tmp_path / "t2.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"body": "three"}) + "\n")
    recs = list(read_records([str(p), str(tmp_path / "t2.jsonl.gz")], DataConfig(text_field="body")))
    assert [(r.text, r.line) for r in recs] == [("one", 1), ("two", 3), ("three", 1)]


def test_chat_auto_detected(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [CHAT, {"messages": [{"role": "system", "content": "S"}] + CHAT["messages"]}])
    (src,) = resolve_sources([str(p)])
    assert src.format == "chat"
    recs = list(read_source(src))
    assert recs[0].messages == CHAT["messages"] and recs[1].messages[0]["role"] == "system"
    assert resolve_sources([str(p)], "text")[0].format == "text"  # an explicit format wins


def test_demo_corpora_resolve_and_read():
    for name in ("demo:shakespeare", "demo:milton"):
        (src,) = resolve_sources([name])
        info = src.info()
        assert info["path"] == name and info["size"] > 100_000 and len(info["sha256"]) == 64
        (rec,) = read_source(src)
        assert len(rec.text) > 300_000 and not rec.text.startswith("\ufeff")


def test_demo_milton_builds(tok):
    s = build_datasets(DataConfig(train=["demo:milton"], seq_len=256, val_fraction=0.0, max_train_blocks=8),
                       tok, progress=False)
    assert len(s.train) == 8 and s.val is None
    assert s.fingerprint["files"][0]["path"] == "demo:milton"
    assert "paradise" in tok.decode(s.train.tokens[:200].tolist()).lower()


BAD_JSONL = [
    ("t.jsonl", ['{"text": "ok"}', '{"text": "oops"'], {}, "t.jsonl:2: not valid JSON"),
    ("t.jsonl", ['{"text": "ok"}', '{"body": "x"}'], {}, "t.jsonl:2: record has no 'text' field"),
    ("t.jsonl", ['{"text": 5}'], {}, "t.jsonl:1: field 'text' must be a string, got int"),
    ("t.jsonl", ['["text"]'], {}, "t.jsonl:1: expected a JSON object, got list"),
    ("c.jsonl", [json.dumps(CHAT), json.dumps({"messages": [{"role": "user", "content": "only"}]})], {},
     "c.jsonl:2: conversation has no assistant turn"),
    ("c.jsonl", [json.dumps(CHAT), "", json.dumps({"messages": [{"role": "wizard", "content": "x"}]})], {},
     "c.jsonl:3: messages[0] has unknown role 'wizard'"),
    ("c.jsonl", [json.dumps({"messages": [{"role": "assistant", "content": 3}]})], {},
     "c.jsonl:1: messages[0].content must be a string"),
    ("c.jsonl", [json.dumps(CHAT), json.dumps({"messages": "hi"})], {}, "c.jsonl:2: 'messages' must be a non-empty list"),
    ("c.jsonl", [json.dumps(CHAT), json.dumps({"text": "x"})], {}, "c.jsonl:2: chat record has no 'messages' field"),
    ("x.txt", ["not json"], {"format": "jsonl"}, "x.txt:1: not valid JSON"),
]


@pytest.mark.parametrize("name,lines,extra,message", BAD_JSONL)
def test_bad_records_name_file_and_line(tmp_path, tok, name, lines, extra, message):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DistilleryError) as err:
        build_datasets(DataConfig(train=[str(p)], seq_len=8, **extra), tok, progress=False)
    assert f"{tmp_path}/{message}" in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_inputs(tmp_path, tok):
    def fails(entries, match, **kw):
        with pytest.raises(DistilleryError, match=match):
            build_datasets(DataConfig(train=entries, **kw), tok, progress=False)

    fails([str(tmp_path / "missing.txt")], "data file or folder '.*missing.txt' does not exist")
    (tmp_path / "empty_dir").mkdir()
    fails([str(tmp_path / "empty_dir")], "holds no .txt/.md/.rst/.jsonl files")
    fails(["demo:nope"], "unknown built-in corpus 'demo:nope'")
    (tmp_path / "empty.txt").write_text("")
    fails([str(tmp_path / "empty.txt")], "no tokens in .*empty.txt")
    (tmp_path / "short.txt").write_text("Too short.")
    fails([str(tmp_path / "short.txt")], "fewer than one block", seq_len=64)
    (tmp_path / "bin.txt").write_bytes(b"line one\nline two \xff\xfe\n")
    fails([str(tmp_path / "bin.txt")], r"bin.txt:2: not UTF-8")
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    fails([str(tmp_path / "bad.txt.gz")], r"bad.txt.gz: cannot read")
    with pytest.raises(DistilleryError, match=r"data.seq_len \(512\).*max_position_embeddings=256"):
        build_datasets(DataConfig(train=[str(tmp_path / "short.txt")], seq_len=512), tok, max_positions=256)
