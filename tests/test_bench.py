"""Runtime benchmark: fresh-process runs, medians and spreads, JSON output, clear errors."""

from __future__ import annotations

import json

import pytest

from distillery.bench import bench_models, summarize
from distillery.errors import DistilleryError
from distillery.export import export_model
from tiny import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_summarize_median_and_spread():
    s = summarize([{"decode_tok_s": 10.0}, {"decode_tok_s": 30.0}, {"decode_tok_s": 12.0}])
    assert s == {"decode_tok_s": {"median": 12.0, "min": 10.0, "max": 30.0}}


def test_torch_bench_runs_in_fresh_processes(student_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench_models([str(student_dir)], "torch", prompt_tokens=32, new_tokens=4, repeats=2, threads=1,
                          json_out=str(out))
    model = result["models"][0]
    assert len(model["runs"]) == 2 and result["machine"]["cores"] >= 1
    for key in ("file_bytes", "load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes"):
        s = model["summary"][key]
        assert 0 < s["min"] <= s["median"] <= s["max"], key
    run = model["runs"][0]
    assert run["peak_rss_bytes"] >= run["base_rss_bytes"] > 0
    assert run["prefill_tok_s"] == pytest.approx(32 / run["prefill_s"])
    assert json.loads(out.read_text())["runtime"] == "torch"
    assert "decode tok/s" in capsys.readouterr().out


@pytest.mark.parametrize("paths,runtime,match", [
    (["/no/such/model"], "torch", "does not exist"),
    ([], "torch", "no model"),
    (["."], "tflite", "tflite is not supported"),
])
def test_bad_arguments(paths, runtime, match):
    with pytest.raises(DistilleryError, match=match):
        bench_models(paths, runtime, repeats=1, show=False)


def test_wrong_kind_of_file_for_runtime(student_dir):
    with pytest.raises(DistilleryError, match="not a .gguf file"):
        bench_models([str(student_dir)], "llamacpp", repeats=1, show=False)


@pytest.mark.llamacpp
def test_llamacpp_bench(student_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    gguf_path = export_model(student_dir, "gguf", tmp_path / "s.gguf", "q8_0", verify=False)["path"]
    result = bench_models([gguf_path], "llamacpp", prompt_tokens=64, new_tokens=8, repeats=1, threads=1, show=False)
    run = result["models"][0]["runs"][0]
    assert run["decode_tok_s"] > 0 and run["file_bytes"] == (tmp_path / "s.gguf").stat().st_size
