"""Embedding transplant (``xtok.transplant``): a pruned student gets its own tokenizer's vocabulary.

Pinned: identical tokenizers change nothing (bit-equal, tied and untied); a token the teacher has copies its row; a
token the teacher cuts into two pieces gets exactly their mean; specials are matched by content (a missing one gets the
mean row); tied stays one tensor, the head and ids follow the student's tokenizer; and a run with ``init: pruned`` +
``student.tokenizer: bpe:N`` trains, saves a student that reloads without distillery, and resumes bit for bit."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from xtok_tokenizers import hand_byte_level, hand_metaspace

from distillery.xtok.transplant import transplant_sources, transplant_vocabulary


def student_byte_level() -> PreTrainedTokenizerFast:
    """Byte-level BPE with the byte alphabet in reverse order (ids differ from the teacher's), ``Ġhello`` (the teacher
    has it), ``Ġwor`` (the teacher: ``Ġw`` + ``or``) and specials in another order, one the teacher lacks."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=True))}
    merges = [("Ġ", "h"), ("Ġh", "e"), ("Ġhe", "l"), ("Ġhel", "l"), ("Ġhell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|pad|>", "<|im_end|>", "<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


@pytest.fixture(scope="module")
def pair():
    t_tok, s_tok = hand_byte_level(), student_byte_level()
    return t_tok, s_tok, transplant_sources(t_tok, s_tok)


@pytest.mark.parametrize("tie", [True, False])
def test_identical_tokenizers_leave_the_embedding_bit_equal(tie):
    tok = tiny_tokenizer(512)
    model = tiny_llama(vocab_size=512, tie=tie)
    emb, head = model.get_input_embeddings().weight.clone(), model.get_output_embeddings().weight.clone()
    transplant_vocabulary(model, tok, tok)
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert torch.equal(model.get_output_embeddings().weight, head)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    assert transplant_sources(tok, tok).counts() == {"exact": 508, "special": 4, "split": 0, "mean": 0, "special_mean": 0}


def test_sources_exact_split_and_special(pair):
    t_tok, s_tok, src = pair
    t, s = t_tok.convert_tokens_to_ids, s_tok.convert_tokens_to_ids
    assert s("Ġhello") != t("Ġhello") and s("A") != t("A")  # other ids: a copy by string, not by id
    assert (src.pieces[s("Ġhello")], src.kind[s("Ġhello")]) == ([t("Ġhello")], "exact")
    assert (src.pieces[s("A")], src.kind[s("A")]) == ([t("A")], "exact")
    assert (src.pieces[s("Ġwor")], src.kind[s("Ġwor")]) == ([t("Ġw"), t("or")], "split")
    assert (src.pieces[s("<|im_end|>")], src.kind[s("<|im_end|>")]) == ([t("<|im_end|>")], "special")
    assert (src.pieces[s("<|endoftext|>")], src.kind[s("<|endoftext|>")]) == ([t("<|endoftext|>")], "special")
    assert (src.pieces[s("<|pad|>")], src.kind[s("<|pad|>")]) == ([], "special_mean")
    assert src.counts() == {"exact": 263, "special": 2, "split": 1, "mean": 0, "special_mean": 1}
    assert src.exact_fraction() == pytest.approx(263 / 264)


def test_a_sentencepiece_student_is_cut_on_its_bytes():
    t_tok, s_tok = hand_byte_level(), hand_metaspace()
    src = transplant_sources(t_tok, s_tok)
    pieces = lambda tok: t_tok.convert_ids_to_tokens(src.pieces[s_tok.convert_tokens_to_ids(tok)])
    assert pieces("▁world") == ["Ġw", "or", "ld"]  # b" world", greedy longest teacher prefix
    assert pieces("<0xE2>") == ["â"]  # a byte-fallback token is its byte's token
    assert pieces("▁Say") == ["Ġ", "Say"]
    assert src.kind[s_tok.convert_tokens_to_ids("</s>")] == "special_mean"


@pytest.mark.parametrize("tie", [True, False])
def test_rows_copied_averaged_and_ids_updated(pair, tie):
    t_tok, s_tok, _ = pair
    model = tiny_llama(vocab_size=len(t_tok), tie=tie)
    E, H = model.get_input_embeddings().weight.detach().clone(), model.get_output_embeddings().weight.detach().clone()
    transplant_vocabulary(model, t_tok, s_tok)
    new_e, new_h = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    t, s = t_tok.convert_tokens_to_ids, s_tok.convert_tokens_to_ids
    assert new_e.shape == (len(s_tok), E.shape[1]) and new_h.shape == new_e.shape
    assert (new_h is new_e) == tie
    for W, old in ((new_e, E), (new_h, H)):
        assert torch.equal(W[s("Ġhello")], old[t("Ġhello")])
        assert torch.equal(W[s("A")], old[t("A")])
        assert torch.equal(W[s("Ġwor")], (old[t("Ġw")] + old[t("or")]) / 2)
        assert torch.equal(W[s("<|im_end|>")], old[t("<|im_end|>")])
        torch.testing.assert_close(W[s("<|pad|>")], old.mean(0), rtol=0, atol=1e-7)
    assert model.config.vocab_size == len(s_tok)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == s("<|endoftext|>") != t("<|endoftext|>")
    assert model.config.pad_token_id == s("<|pad|>")
    ids = s_tok("Say hello world", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(s_tok))


def _recipe(root, out):
    from helpers_run import write_recipe

    return write_recipe(root, out, student={"init": "pruned", "tokenizer": "bpe:400",
                                            "prune": {"layers": 1, "hidden": 32, "ffn": 64, "heads": 2,
                                                      "calibration_batches": 2}},
                        data={"max_train_blocks": 16, "max_val_blocks": 2},
                        train={"max_steps": 4, "save_every": 2, "eval_every": 0, "eval_batches": 1,
                               "mixed_precision": "no"})


def test_a_pruned_student_with_its_own_tokenizer_trains_saves_and_resumes(tmp_path):
    from helpers_run import run_metrics
    from safetensors.torch import load_file

    from distillery.config import load_config
    from distillery.train import distill

    run = tmp_path / "run"
    distill(load_config(_recipe(tmp_path, run)))
    tok = AutoTokenizer.from_pretrained(str(run / "student"))
    assert len(tok) == 400 and tok.get_vocab() == AutoTokenizer.from_pretrained(str(run / "student_tokenizer")).get_vocab()
    model = AutoModelForCausalLM.from_pretrained(str(run / "student"))
    assert model.get_input_embeddings().weight.shape == (400, 32) and model.get_output_embeddings().weight.shape == (400, 32)
    assert model.config.num_hidden_layers == 1 and model.config.eos_token_id == tok.eos_token_id
    losses = [m["loss"] for m in run_metrics(run) if "loss" in m]
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses)
    final = load_file(str(run / "student" / "model.safetensors"))
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # as if it stopped after the step-2 checkpoint
    shutil.rmtree(run / "student")
    distill(load_config(_recipe(tmp_path, run)), resume=True)
    again = load_file(str(run / "student" / "model.safetensors"))
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    assert [m["loss"] for m in run_metrics(run) if "loss" in m] == losses


def test_lora_on_a_transplanted_vocabulary_is_refused(tmp_path):
    """LoRA trains only its adapters: the averaged embedding rows would stay as transplanted. One clear line."""
    from distillery.config import load_config
    from distillery.errors import DistilleryError
    from distillery.train import distill

    cfg = load_config(_recipe(tmp_path, tmp_path / "run"), ["student.lora.rank=4"])
    with pytest.raises(DistilleryError, match="student.lora with student.init 'pruned' and student.tokenizer"):
        distill(cfg)
