"""teacher.kind api_logprobs: distill from a generated data set with its stored top_logprobs (tiny, offline).

The "server" here is a tiny random Llama scored on the rendered chat, written out in the exact record
format of `distillery generate` (token text + UTF-8 bytes + top_logprobs), so the sparse KD term
has a real distribution to follow and the hand computation knows every id.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from distillery.api.targets import _byte_decoder
from distillery.config import load_config
from distillery.run_setup import prepare_run
from distillery.train import distill
from helpers_run import make_teacher
from tiny import tiny_llama, tiny_tokenizer

K = 5
WORDS = "the king is dead long live the queen of night and day".split()


def token_bytes(tok, i: int) -> bytes:
    """The exact bytes of token ``i`` (byte-level BPE spells byte b as one printable character)."""
    t = tok.convert_ids_to_tokens(i)
    if i in tok.all_special_ids:
        return t.encode()
    return bytes(_byte_decoder()[c] for c in t)


def _entry(tok, i: int, lp: float) -> dict:
    """What an OpenAI-compatible server reports for token ``i``: its text, UTF-8 bytes, logprob."""
    b = token_bytes(tok, i)
    return {"token": b.decode("utf-8", "replace"), "bytes": list(b), "logprob": lp}


def generate_records(tok, model, n: int, length: int = 12, seed: int = 0, sharpen: float = 25.0) -> list[dict]:
    """Records as `distillery generate` writes them, answered by ``model`` (sampled, top-K logprobs).

    ``sharpen`` scales the random model's logits so its distribution is peaked like a trained model's
    (a random one is near uniform over 512 ids: its top-5 would hold ~1% of the mass)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.tensor([i for i in range(len(tok)) if i > 3 and "\ufffd" not in tok.decode([i])])
    out = []
    for r in range(n):
        msgs = [{"role": "user", "content": " ".join(WORDS[(r + j) % len(WORDS)] for j in range(4))}]
        prompt = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        ids, content = list(prompt), []
        with torch.no_grad():
            for _ in range(length):
                lp = (model(torch.tensor([ids])).logits[0, -1] * sharpen).log_softmax(-1)  # (V,)
                p = torch.zeros_like(lp)
                p[clean] = lp[clean].exp()
                nxt = int(torch.multinomial(p, 1, generator=g))
                top = lp.topk(K)
                e = _entry(tok, nxt, float(lp[nxt]))
                e["top_logprobs"] = [_entry(tok, int(i), float(v)) for v, i in zip(top.values, top.indices)]
                content.append(e)
                ids.append(nxt)
        text = b"".join(bytes(e["bytes"]) for e in content).decode("utf-8")
        out.append({"id": f"r{r:03d}", "messages": msgs + [{"role": "assistant", "content": text}],
                    "finish_reason": "length", "logprobs": content})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_distill")
    teacher_dir = make_teacher(root, seed=5)
    tok = tiny_tokenizer()
    model = tiny_llama(seed=5)  # the same weights as the saved teacher: the "served" model
    records = generate_records(tok, model, 40)
    return root, teacher_dir, tok, records


def recipe(root: Path, teacher_dir: Path, data_file: Path, out: str, **sections) -> Path:
    r = {"teacher": {"kind": "api_logprobs", "source": str(teacher_dir)},
         "student": {"model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 1}},
         "data": {"train": [str(data_file)], "seq_len": 64, "val_fraction": 0.1},
         "loss": {"kd": "forward_kl", "kd_weight": 1.0, "ce_weight": 1.0, "chunk_size": 40},
         "train": {"output_dir": str(root / out), "max_steps": 30, "micro_batch_size": 4, "lr": 1e-2,
                   "warmup_steps": 2, "eval_every": 0, "save_every": 0, "progress": False}}
    for sec, values in sections.items():
        r.setdefault(sec, {}).update(values)
    p = root / f"{out}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kd"' in x]


def test_recipe_trains_with_the_sparse_kd_term_and_the_loss_decreases(world, capsys):
    root, teacher_dir, tok, records = world
    data = write_jsonl(root / "gen.jsonl", records)
    summary = distill(load_config(recipe(root, teacher_dir, data, "kd")))
    err = capsys.readouterr().err
    assert "sparse KD from the top-5 log-probabilities" in err and "40 of 40 records" in err
    api = summary["api_teacher"]
    assert api["shared_tokenizer"] and api["kd_records"] == 40 and api["kd_tokens"] == 40 * 12 and api["top_k"] == K
    m = metrics(root / "kd")
    assert len(m) == 30 and all(x["kd"] > 0 for x in m)
    first, last = sum(x["kd"] for x in m[:3]) / 3, sum(x["kd"] for x in m[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert sum(x["loss"] for x in m[-3:]) < 0.8 * sum(x["loss"] for x in m[:3])
    val = summary["validation"]
    assert val["kl_teacher_student"] is not None and val["kl_teacher_student"] > 0 and val["tokens"] > 0
    # the effective config is the one asked for (no fallback)
    cfg = yaml.safe_load((root / "kd" / "config.yaml").read_text())
    assert cfg["loss"]["kd_weight"] == 1.0 and cfg["teacher"]["kind"] == "api_logprobs"


def _bucket_kl(s_logp: torch.Tensor, top: list[tuple[int, float]]) -> float:
    """Forward KL over the K+1 buckets (top-K ids + one tail bucket), written out for one position."""
    ids = [i for i, _ in top]
    p = [math.exp(v) for _, v in top]
    kl = sum(pk * (v - float(s_logp[i])) for pk, (i, v) in zip(p, top))
    p_tail = 1.0 - sum(p)
    rest = torch.ones_like(s_logp, dtype=torch.bool)
    rest[ids] = False
    q_tail = float(s_logp[rest].exp().sum())
    return kl + p_tail * (math.log(p_tail) - math.log(q_tail))


def test_kd_term_equals_a_hand_computation_on_one_record(world):
    root, teacher_dir, tok, records = world
    rec = records[3]
    data = write_jsonl(root / "one.jsonl", [rec])
    r = recipe(root, teacher_dir, data, "one", data={"val_fraction": 0.0},
               train={"max_steps": 1, "micro_batch_size": 1, "warmup_steps": 0})
    cfg = load_config(r)
    run = prepare_run(cfg, torch.device("cpu"))  # the same seeded student distill starts from
    student = run.student.eval()
    # By hand: the prompt as the server rendered it, the server's answer ids, the template's end of turn.
    prompt = list(tok.apply_chat_template(rec["messages"][:1], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"])
    byte_map = {token_bytes(tok, i): i for i in range(len(tok))}
    answer = [byte_map[bytes(e["bytes"])] for e in rec["logprobs"]]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    seq = prompt + answer + [end]
    batch = run.train.batch([0])
    assert batch["input_ids"][0, :len(seq) - 1].tolist() == seq[:-1]
    labels = batch["labels"][0]
    assert labels[len(prompt) - 1:len(seq) - 1].tolist() == answer + [end] and int((labels != -100).sum()) == len(answer) + 1
    with torch.no_grad():
        logp = student(torch.tensor([seq])).logits[0].log_softmax(-1)  # (L, V)
    hand = 0.0
    for t, e in enumerate(rec["logprobs"]):
        top = [(byte_map[bytes(a["bytes"])], a["logprob"]) for a in e["top_logprobs"]]
        hand += _bucket_kl(logp[len(prompt) - 1 + t], top)
    hand /= len(answer) + 1  # n_tokens counts the end-of-turn label too (it has CE, no teacher row)
    summary = distill(cfg)
    kd = metrics(root / "one")[0]["kd"]
    assert kd > 0.1
    assert abs(kd - hand) < 1e-4 * hand, (kd, hand)
    assert summary["api_teacher"]["kd_tokens"] == len(answer)


def _single_char_split(tok) -> tuple[int, list[int]]:
    """A clean multi-character token and the ids of its characters (a non-canonical split of it)."""
    vocab = tok.get_vocab()
    for t, i in sorted(vocab.items(), key=lambda x: x[1]):
        s = tok.convert_tokens_to_string([t])
        if len(s) >= 3 and s.isascii() and s.strip().isalpha() and all(c in vocab or c == " " for c in s):
            parts = [tok.convert_tokens_to_ids("\u0120" if c == " " else c) for c in s]
            if all(p is not None and p != tok.unk_token_id for p in parts):
                return i, parts
    raise AssertionError("no splittable token in the tiny vocabulary")


def test_misaligned_unmappable_and_retokenized_records_are_counted(world, capsys):
    root, teacher_dir, tok, records = world
    recs = [json.loads(json.dumps(r)) for r in records]
    recs[0].pop("logprobs")  # no log-probabilities: text only
    recs[1]["logprobs"][2].update(token="", bytes=None)  # llama-cpp-python: lost the bytes of a token
    recs[2]["messages"][-1]["content"] += "!"  # the tokens do not spell the answer
    recs[3]["logprobs"][4].update(token="zqxj", bytes=list(b"zqxj"))  # a generated token with no id
    recs[3]["messages"][-1]["content"] = b"".join(bytes(x["bytes"]) for x in recs[3]["logprobs"]).decode()
    recs[4]["logprobs"][1]["top_logprobs"][3].update(token="zqxw", bytes=list(b"zqxw"))  # an alternative with no id
    recs[6]["logprobs"][0]["top_logprobs"][1].update(token="", bytes=None)  # an alternative whose bytes were lost
    # A non-canonical split: the server emitted a word character by character.
    whole, parts = _single_char_split(tok)
    lp = recs[5]["logprobs"]
    e = _entry(tok, whole, -0.5)
    split = []
    for p in parts:
        x = _entry(tok, p, -0.5)
        x["top_logprobs"] = [dict(x, logprob=-0.5)] + [dict(a) for a in lp[0]["top_logprobs"] if a["token"] != x["token"]][:K - 1]
        split.append(x)
    recs[5]["logprobs"] = split + lp
    recs[5]["messages"][-1]["content"] = b"".join(bytes(x["bytes"]) for x in recs[5]["logprobs"]).decode()
    data = write_jsonl(root / "mixed.jsonl", recs)
    run = prepare_run(load_config(recipe(root, teacher_dir, data, "mixed", data={"val_fraction": 0.0})),
                      torch.device("cpu"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparse KD" in err[0] and "text only (CE) for 4" in err[0], err
    s = run.teacher_stats
    assert s["shared_tokenizer"]
    assert {k: v for k, v in s["text_only"].items() if v} == {"no_logprobs": 1, "lost_bytes": 1, "text_mismatch": 1, "unmapped": 1}
    assert s["unmapped_tokens"] == 1 and s["unmapped_alternatives"] == 1 and s["kd_records"] == 36
    # Rows short of K usable alternatives (record 4's and record 6's) get no KD term; K stays at 5.
    assert s["lost_alternatives"] == 1 and s["short_rows"] == 2 and s["top_k"] == K
    assert int((~run.teacher.has_row).sum()) == 2
    assert s["retokenized"] >= 1  # record 5 (sampled records may be non-canonical too)
    # Record 5 trains on the server's split, and its rows follow it.
    ds = run.train
    seqs = [ds.batch([b]) for b in range(len(ds))]
    found = False
    for b in seqs:
        ids, rows = b["input_ids"][0].tolist(), b["teacher_row"][0].tolist()
        for i in range(len(ids) - len(parts) + 1):
            if ids[i:i + len(parts)] == parts and ids[i + len(parts):i + len(parts) + 2] == [
                    _entry_id(tok, recs[5]["logprobs"][len(parts)]), _entry_id(tok, recs[5]["logprobs"][len(parts) + 1])]:
                found = True
                first_row = rows[i - 1]  # the label of position i - 1 is parts[0]
                assert first_row >= 0 and rows[i - 1:i + len(parts) - 1] == list(range(first_row, first_row + len(parts)))
                assert run.teacher.top_ids[first_row, 0] == parts[0]
    assert found
    # The alternative with no id is left out of its row: its mass is in the tail bucket.
    tt = run.teacher.targets(seqs[0], vocab_size=len(tok))
    assert tt.mask.any() and torch.isfinite(tt.tail_logprob[tt.mask]).all()


def _entry_id(tok, e: dict) -> int:
    return {token_bytes(tok, i): i for i in range(len(tok))}[bytes(e["bytes"])]


@pytest.fixture(scope="module")
def other_student(world):
    """A pretrained student with its own, smaller tokenizer (300 entries)."""
    root = world[0]
    d = root / "other_student"
    tiny_llama(vocab_size=300, hidden=32, layers=1, seed=2).save_pretrained(d)
    tiny_tokenizer(300).save_pretrained(d)
    return d


@pytest.mark.parametrize("name_teacher", [False, True])
def test_other_tokenizer_says_so_in_one_line_and_trains_on_the_text(world, other_student, capsys, name_teacher):
    root, teacher_dir, tok, records = world
    data = write_jsonl(root / "gen_other.jsonl", records)
    out = f"other-{name_teacher}"
    r = recipe(root, teacher_dir, data, out, student={"init": "pretrained", "pretrained": str(other_student), "model": {}},
               loss={"ce_weight": 0.0}, train={"max_steps": 12})
    raw = yaml.safe_load(r.read_text())
    if not name_teacher:  # only the data can tell: the server's tokens have no ids in the student's vocabulary
        del raw["teacher"]["source"]
        r.write_text(yaml.safe_dump(raw))
    summary = distill(load_config(r))
    err = [ln for ln in capsys.readouterr().err.splitlines() if "api_logprobs" in ln]
    assert len(err) == 1 and "only the text is used (sequence-level KD" in err[0], err
    assert ("is not teacher.source" in err[0]) if name_teacher else ("have no id in the student's tokenizer" in err[0])
    assert not summary["api_teacher"]["shared_tokenizer"] and summary["api_teacher"]["kd_records"] == 0
    m = metrics(root / out)
    assert all(x["kd"] == 0 for x in m) and m[-1]["ce"] < m[0]["ce"]
    cfg = yaml.safe_load((root / out / "config.yaml").read_text())
    assert cfg["loss"]["kd_weight"] == 0.0 and cfg["loss"]["ce_weight"] == 1.0  # the config in effect
    assert summary["validation"]["kl_teacher_student"] is None and summary["validation"]["student_perplexity"] > 1


def test_records_without_logprobs_say_so_and_train_on_the_text(world, capsys):
    root, teacher_dir, tok, records = world
    plain = [{k: v for k, v in r.items() if k != "logprobs"} for r in records]
    data = write_jsonl(root / "plain.jsonl", plain)
    summary = distill(load_config(recipe(root, teacher_dir, data, "plain", train={"max_steps": 4})))
    err = [ln for ln in capsys.readouterr().err.splitlines() if "api_logprobs" in ln]
    assert len(err) == 1 and "none of the 40 chat records has usable top_logprobs (no_logprobs: 40)" in err[0]
    assert "only the text is used" in err[0]
    assert summary["api_teacher"]["kd_records"] == 0 and all(x["kd"] == 0 and x["ce"] > 0 for x in metrics(root / "plain"))
