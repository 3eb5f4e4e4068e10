"""The bad-input catalogue: what a user can get wrong, and the one line `distillery` answers with.

Each :class:`Case` builds its inputs under a fresh folder and returns the command line; the test
(``test_bad_inputs.py``) runs it through ``distillery.cli.main``, checks the exit status, that stderr
holds exactly one ``error: ...`` line matching ``expect``, and that nothing half-written was left in
the case's output folder. ``docs/errors.md`` is generated from this table and the messages seen.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from helpers_run import make_corpus, make_teacher


SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 1}


@dataclass
class Ctx:
    """What a case builds on: ``base`` (shared tiny teacher and corpus), ``tmp`` (its own folder), ``stub`` (a URL)."""

    base: Path
    tmp: Path
    stub: str = ""
    bad_server: str = ""

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def recipe(self, name: str = "recipe.yaml", **sections) -> Path:
        r = {"teacher": {"source": str(make_teacher(self.base))},
             "student": {"model": dict(SMALL)},
             "data": {"train": [str(make_corpus(self.base))], "seq_len": 32, "val_fraction": 0.1,
                      "max_train_blocks": 16, "max_val_blocks": 4},
             "train": {"output_dir": str(self.out), "max_steps": 2, "micro_batch_size": 4, "eval_every": 0,
                       "save_every": 0, "eval_batches": 1, "progress": False}}
        for sec, values in sections.items():
            r.setdefault(sec, {}).update(values)
        p = self.tmp / name
        p.write_text(yaml.safe_dump(r))
        return p

    def file(self, name: str, text: str | bytes) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
        return p

    def data(self, name: str, text: str | bytes, **data) -> list[str]:
        return ["distill", str(self.recipe(data={"train": [str(self.file(name, text))], **data}))]

    def api(self, url: str | None = None, **kw) -> Path:
        prompts = self.file("prompts.jsonl", "".join(json.dumps({"prompt": f"Q{i}?"}) + "\n" for i in range(3)))
        cfg = {"base_url": url or self.stub, "model": "stub", "api_key_env": "DISTILLERY_CATALOGUE_KEY",
               "prompts": [str(prompts)], "output": str(self.out / "data.jsonl"), "timeout": 2.0, "max_retries": 1,
               "backoff_base": 0.01, "backoff_max": 0.02, "progress_every": 0, **kw}
        return self.file("api.yaml", yaml.safe_dump({"api": cfg}))


@dataclass(frozen=True)
class Case:
    id: str
    area: str  # cli | config | data | model | tokenizer | cache | api | run
    what: str
    build: Callable[[Ctx], list[str]]
    expect: str  # regex for the message after "error: "
    status: int = 2


def _cache(ctx: Ctx, *extra: str) -> Path:
    """A small finished teacher cache for the recipe (built once per case folder through the CLI)."""
    from distillery.cli import main

    out = ctx.tmp / "cache"
    assert main(["cache", str(ctx.recipe("cache-recipe.yaml")), "--out", str(out), "--k", "8", "--shard-blocks", "8",
                 "--no-progress", *extra]) == 0
    return out


def _truncate_first_shard(ctx: Ctx) -> Path:
    cache = _cache(ctx)
    shard = sorted((cache / "train").glob("*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    return cache


def _checkpointed(ctx: Ctx) -> list[str]:
    from distillery.cli import main

    recipe = ctx.recipe()
    assert main(["distill", str(recipe), "train.max_steps=1"]) == 0
    return ["distill", str(recipe), "train.max_steps=1"]


def _cut_short_run(ctx: Ctx) -> list[str]:
    import shutil

    from distillery.cli import main

    recipe = ctx.recipe()
    assert main(["distill", str(recipe), "train.max_steps=1"]) == 0
    for name in ("checkpoints", "student"):  # as if killed before its first checkpoint
        shutil.rmtree(ctx.out / name)
    (ctx.out / "summary.json").unlink()
    return ["distill", str(recipe), "train.max_steps=1"]


def _corrupt_tokenizer_teacher(ctx: Ctx) -> list[str]:
    import shutil

    folder = ctx.tmp / "teacher-bad-tok"
    shutil.copytree(make_teacher(ctx.base), folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return ["distill", str(ctx.recipe(teacher={"source": str(folder)}))]


def _generate_after_corrupt_output(ctx: Ctx) -> list[str]:
    recipe = ctx.api()
    ctx.file("out/data.jsonl", '{"id": "a", "messages": []}\nnot json at all\n{"id": "b"}\n')
    return ["generate", str(recipe), "--quiet"]


HELD: list = []  # lock files held open by a case (the "other run" of run-locked)


def _copy_teacher(ctx: Ctx, name: str) -> Path:
    import shutil

    folder = ctx.tmp / name
    shutil.copytree(make_teacher(ctx.base), folder)
    return folder


def _truncated(folder: Path) -> Path:
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return folder


def _pickle_only(folder: Path) -> Path:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # the name is what matters: never opened
    return folder


def _student(ctx: Ctx, name: str = "student", hidden: int = 32, layers: int = 1) -> Path:
    from tiny import tiny_llama, tiny_tokenizer

    folder = ctx.tmp / name
    tiny_llama(vocab_size=512, hidden=hidden, layers=layers, heads=2, kv_heads=1, ffn=2 * hidden).save_pretrained(folder)
    tiny_tokenizer(512).save_pretrained(folder)
    return folder


def _eval(ctx: Ctx, *flags: str, student: Path | None = None) -> list[str]:
    s = student or _student(ctx)
    return ["eval", "--teacher", str(make_teacher(ctx.base)), "--student", str(s), "--data",
            str(make_corpus(ctx.base)), "--seq-len", "32", "--max-blocks", "4", *flags]


def _edit_manifest(ctx: Ctx, edit) -> list[str]:
    cache = _cache(ctx)
    m = json.loads((cache / "manifest.json").read_text())
    edit(m)
    (cache / "manifest.json").write_text(json.dumps(m))
    return ["distill", str(ctx.recipe(teacher={"kind": "cache", "cache_path": str(cache)}))]


def _ran(ctx: Ctx, *overrides: str) -> Path:
    """A finished one-step run in ctx.out (its recipe returned)."""
    from distillery.cli import main

    recipe = ctx.recipe()
    assert main(["distill", str(recipe), "train.max_steps=1", *overrides]) == 0
    return recipe


def _locked(ctx: Ctx) -> list[str]:
    import fcntl

    ctx.out.mkdir(parents=True, exist_ok=True)
    fh = open(ctx.out / ".lock", "a+")
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.write("4242 other-host 2024-01-01T00:00:00\n")
    fh.flush()
    HELD.append(fh)  # closed (and so released) by the test after the case
    return ["distill", str(ctx.recipe())]


def _bad_metrics(ctx: Ctx) -> list[str]:
    recipe = _ran(ctx)
    with open(ctx.out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": "two", "loss": 1.0}\n')
    return ["distill", str(recipe), "--resume", "train.max_steps=2"]


def _all_checkpoints_damaged(ctx: Ctx) -> list[str]:
    recipe = _ran(ctx)
    _truncated(next((ctx.out / "checkpoints").glob("step-*")))
    return ["distill", str(recipe), "--resume", "train.max_steps=2"]


def _report_run(ctx: Ctx, line: str) -> list[str]:
    ctx.file("run/metrics.jsonl", '{"step": 1, "loss": 2.0, "tok_s": 10.0}\n' + line)
    return ["report", str(ctx.tmp / "run")]


CASES: list[Case] = [
    # ---------------------------------------------------------------- command line
    Case("cli-no-verb", "cli", "no command given", lambda c: [], r"the following arguments are required: COMMAND"),
    Case("cli-unknown-verb", "cli", "a misspelt command", lambda c: ["distil", "r.yaml"], r"invalid choice: 'distil'"),
    Case("cli-no-recipe", "cli", "`distill` without a recipe", lambda c: ["distill"], r"distill: the following arguments are required: recipe"),
    Case("cli-unknown-flag", "cli", "an unknown option", lambda c: ["distill", str(c.recipe()), "--restart"], r"unrecognized arguments: --restart"),
    Case("cli-demo-minutes", "cli", "`demo` with a negative time budget", lambda c: ["demo", "--minutes", "-5", "--output-dir", str(c.tmp / "demo")], r"demo: --minutes must be >= 0 \(0: no budget; got -5.0\)"),
    Case("cli-bad-number", "cli", "a non-number where a number goes", lambda c: ["eval", "--teacher", "t", "--student", "s", "--data", "d", "--seq-len", "many"], r"argument --seq-len: invalid int value: 'many'"),
    Case("cli-eval-prompt-too-long", "cli", "`eval --own-samples` with a prompt as long as the block", lambda c: ["eval", "--teacher", "t", "--student", "s", "--data", "d", "--seq-len", "32", "--own-samples", "8", "--prompt-tokens", "32"], r"--prompt-tokens 32 must be shorter than --seq-len 32"),
    Case("cli-plan-negative-memory", "cli", "`plan --memory-gb` not positive", lambda c: ["plan", str(c.recipe()), "--memory-gb", "0"], r"--memory-gb: must be a positive number"),
    Case("cli-cache-nothing", "cli", "`cache` with neither a recipe nor --info", lambda c: ["cache"], r"give a recipe .* or --info DIR"),
    # ---------------------------------------------------------------- config
    Case("config-missing-recipe", "config", "the recipe file does not exist", lambda c: ["distill", str(c.tmp / "nope.yaml")], r"recipe '.*nope.yaml' does not exist"),
    Case("config-bad-yaml", "config", "the recipe is not valid YAML", lambda c: ["distill", str(c.file("r.yaml", "train:\n  max_steps: [1,\n"))], r"r.yaml:\d+: not valid YAML"),
    Case("config-not-mapping", "config", "the recipe is a list, not sections", lambda c: ["distill", str(c.file("r.yaml", "- a\n- b\n"))], r"a recipe must be a mapping of sections, got list"),
    Case("config-unknown-key", "config", "a misspelt key (override)", lambda c: ["distill", str(c.recipe()), "train.max_stepz=3"], r"config key 'train.max_stepz' is not a known setting \(did you mean 'train.max_steps'\?\)"),
    Case("config-on-policy-never", "config", "on-policy steps asked for, but `on_policy_start` is past the last step", lambda c: ["distill", str(c.recipe()), "generation.on_policy_fraction=0.5", "generation.on_policy_start=999"], r"generation.on_policy_start \(999\) is not below train.max_steps \(\d+\): no step would be on-policy"),
    Case("config-unknown-section-key", "config", "a misspelt key (in the file)", lambda c: ["distill", str(c.recipe(loss={"temprature": 2.0}))], r"config key 'loss.temprature' is not a known setting \(did you mean 'loss.loss_temperature'\?\)"),
    Case("config-wrong-type", "config", "a word where a number goes", lambda c: ["distill", str(c.recipe()), "train.max_steps=lots"], r"config key 'train.max_steps': Input should be a valid integer.*'lots'"),
    Case("config-out-of-range", "config", "a value out of range", lambda c: ["distill", str(c.recipe()), "train.max_steps=0"], r"config key 'train.max_steps': Input should be greater than 0"),
    Case("config-bad-choice", "config", "a value outside a closed set", lambda c: ["distill", str(c.recipe()), "loss.kd=kl"], r"config key 'loss.kd': Input should be 'forward_kl', "),
    Case("config-override-no-equals", "config", "an override without '='", lambda c: ["distill", str(c.recipe()), "train.max_steps"], r"override 'train.max_steps' is not of the form key=value"),
    Case("config-override-into-value", "config", "an override that treats a value as a section", lambda c: ["distill", str(c.recipe()), "train.max_steps.x=1"], r"override 'train.max_steps.x=1': 'max_steps' is not a section"),
    Case("config-output-is-file", "config", "train.output_dir is an existing file", lambda c: ["distill", str(c.recipe(train={"output_dir": str(c.file("out", "x"))}))], r"train.output_dir '.*out' is a file, not a folder"),
    Case("config-checkpoints-no-resume", "config", "rerun into a folder with checkpoints, without --resume", _checkpointed, r"already holds checkpoints: pass --resume"),
    Case("config-run-no-resume", "config", "rerun into a run cut short before its first checkpoint, without --resume (was: its metrics.jsonl appended to)", _cut_short_run, r"already holds a run \(config.yaml, metrics.jsonl\) and no checkpoint"),
    Case("config-output-foreign", "config", "train.output_dir holds other files (was: the run written among them)", lambda c: ["distill", str(c.recipe(train={"output_dir": str(c.file("mine/notes.txt", "x").parent)}))], r"train.output_dir '.*mine' holds files that are not a run's \(notes.txt\)"),
    Case("config-cache-without-path", "config", "teacher.kind cache without teacher.cache_path", lambda c: ["distill", str(c.recipe(teacher={"kind": "cache"}))], r"teacher.kind is 'cache' but teacher.cache_path is not set"),
    Case("config-seq-len-too-long", "config", "data.seq_len above the student's positions", lambda c: ["distill", str(c.recipe(data={"seq_len": 600}))], r"seq_len"),
    Case("config-api-unknown-key", "config", "a misspelt key in a generate recipe", lambda c: ["generate", str(c.api(concurrancy=3))], r"config key 'api.concurrancy' is not a known setting"),
    # ---------------------------------------------------------------- data
    Case("data-missing-file", "data", "a training file that does not exist", lambda c: ["distill", str(c.recipe(data={"train": [str(c.tmp / "gone.txt")]}))], r"gone.txt"),
    Case("data-bad-json-line", "data", "a JSONL line that is not JSON", lambda c: c.data("d.jsonl", '{"text": "ok"}\n{"text": oops}\n'), r"d.jsonl:2: "),
    Case("data-missing-field", "data", "a JSONL record without the text field", lambda c: c.data("d.jsonl", '{"text": "ok"}\n{"body": "no"}\n'), r"d.jsonl:2: .*'text'"),
    Case("data-not-object", "data", "a JSONL line that is not an object", lambda c: c.data("d.jsonl", '{"text": "ok"}\n[1, 2]\n'), r"d.jsonl:2: "),
    Case("data-bad-role", "data", "a chat message with an unknown role", lambda c: c.data("c.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}) + "\n"), r"c.jsonl:1: .*robot"),
    Case("data-not-utf8", "data", "a text file that is not UTF-8", lambda c: c.data("latin.txt", "caf\xe9 ".encode("latin-1") * 2000), r"latin.txt"),
    Case("data-bad-gzip", "data", "a .gz file that is not gzip", lambda c: c.data("d.txt.gz", b"not gzip at all" * 100), r"d.txt.gz"),
    Case("data-too-little", "data", "less text than one global batch", lambda c: c.data("tiny.txt", "a few words only\n"), r"tiny.txt make only \d+ tokens, fewer than one block"),
    Case("data-weights-negative", "data", "a negative `data.weights` entry", lambda c: ["distill", str(c.recipe()), "data.weights.chat=-2"], r"config key 'data.weights.chat': Input should be greater than or equal to 0"),
    Case("data-weights-nothing", "data", "`data.weights` that leave no block to train on (plain text only, its weight 0)", lambda c: ["distill", str(c.recipe()), "data.weights.text=0"], r"data.weights \{'text': 0.0\} leave none of the \d+ plain-text blocks to train on"),
    # ---------------------------------------------------------------- models
    Case("model-teacher-not-found", "model", "a teacher path that does not exist", lambda c: ["distill", str(c.recipe(teacher={"source": str(c.tmp / "no" / "model")}))], r"teacher '.*no/model' is neither a model folder, a .gguf file nor a hub id"),
    Case("model-teacher-no-config", "model", "a teacher folder without config.json", lambda c: ["distill", str(c.recipe(teacher={"source": str(c.file("empty-model/README", "x").parent)}))], r"teacher folder '.*empty-model' has no config.json"),
    Case("model-teacher-gguf-missing", "model", "a .gguf teacher file that does not exist", lambda c: ["distill", str(c.recipe(teacher={"source": str(c.tmp / "t.gguf")}))], r"teacher file '.*t.gguf' does not exist"),
    Case("model-teacher-bad-gguf", "model", "a .gguf teacher that is not GGUF", lambda c: ["distill", str(c.recipe(teacher={"source": str(c.file("bad.gguf", b"\0" * 64))}))], r"bad.gguf"),
    Case("model-teacher-device", "model", "teacher.device that does not exist", lambda c: ["distill", str(c.recipe(teacher={"device": "cuda:7"}))], r"teacher.device 'cuda:7' does not exist here"),
    Case("model-student-family", "model", "an unsupported student family", lambda c: ["distill", str(c.recipe(student={"model": {**SMALL, "model_type": "gpt2"}}))], r"student.model.model_type 'gpt2' is not supported"),
    Case("model-student-heads", "model", "attention heads not a multiple of KV heads", lambda c: ["distill", str(c.recipe(student={"model": {**SMALL, "hidden_size": 36, "num_attention_heads": 3, "num_key_value_heads": 2}}))], r"num_attention_heads \(3\) must be a multiple of num_key_value_heads \(2\)"),
    Case("model-student-sizes-unset", "model", "student.model without sizes (the family's 7B defaults)", lambda c: ["distill", str(c.recipe(student={"model": {"model_type": "llama"}}))], r"student.model builds a [\d,.]+M-parameter student, larger than the teacher"),
    Case("model-pretrained-unset", "model", "student.init pretrained without a folder", lambda c: ["distill", str(c.recipe(student={"init": "pretrained"}))], r"student.pretrained \(a folder\) is not set"),
    Case("model-pretrained-not-model", "model", "student.pretrained folder without a model", lambda c: ["distill", str(c.recipe(student={"init": "pretrained", "pretrained": str(c.tmp)}))], r"is not a model folder \(no config.json\)"),
    # ---------------------------------------------------------------- tokenizers
    Case("tok-student-vocab-small", "tokenizer", "a student vocabulary smaller than the tokenizer", lambda c: ["distill", str(c.recipe(student={"model": {**SMALL, "vocab_size": 100}}))], r"student output layer has 100 logits but the tokenizer has 512 tokens"),
    Case("tok-corrupt", "tokenizer", "a teacher folder whose tokenizer.json is corrupt", _corrupt_tokenizer_teacher, r"cannot load teacher .*tokenizer"),
    # ---------------------------------------------------------------- teacher caches
    Case("cache-not-a-cache", "cache", "teacher.cache_path is not a cache", lambda c: ["distill", str(c.recipe(teacher={"kind": "cache", "cache_path": str(c.tmp)}))], r"is not a teacher cache \(no manifest.json\)"),
    Case("cache-other-data", "cache", "a cache written for other data", lambda c: ["distill", str(c.recipe(teacher={"kind": "cache", "cache_path": str(_cache(c))}, data={"max_train_blocks": 12}))], r"(data|fingerprint)"),
    Case("cache-other-temperature", "cache", "a cache written at another loss temperature", lambda c: ["distill", str(c.recipe(teacher={"kind": "cache", "cache_path": str(_cache(c))}, loss={"loss_temperature": 2.0}))], r"loss_temperature"),
    Case("cache-truncated-shard", "cache", "a cache shard cut short", lambda c: ["distill", str(c.recipe(teacher={"kind": "cache", "cache_path": str(_truncate_first_shard(c))}))], r"cache shard .* has \d+ bytes, the manifest says \d+"),
    Case("cache-out-foreign", "cache", "`cache --out` a folder of other files (was: the cache written among them)", lambda c: ["cache", str(c.recipe("cache-recipe.yaml")), "--out", str(c.file("mine/notes.txt", "x").parent)], r"cache folder '.*mine' holds files that are not a teacher cache's \(notes.txt\)"),
    Case("cache-info-missing", "cache", "`cache --info` on a folder that is not there", lambda c: ["cache", "--info", str(c.tmp / "nothing")], r"nothing"),
    # ---------------------------------------------------------------- served teacher (API)
    Case("api-key-unset", "api", "the API key variable is not set (a remote server)", lambda c: ["generate", str(c.api(url="https://api.example.invalid/v1", api_key_env="DISTILLERY_UNSET_KEY_VAR")), "--quiet"], r"api.api_key_env: environment variable DISTILLERY_UNSET_KEY_VAR is not set"),
    Case("api-401", "api", "the server rejects the key (HTTP 401)", lambda c: ["generate", str(c.api(url=c.bad_server + "/401/v1")), "--quiet"], r"refused the run: .*401"),
    Case("api-404", "api", "the server does not know the model (HTTP 404)", lambda c: ["generate", str(c.api(url=c.bad_server + "/404/v1")), "--quiet"], r"refused the run: .*404"),
    Case("api-garbage", "api", "the server answers 200 with something that is not a chat completion", lambda c: ["generate", str(c.api(url=c.bad_server + "/garbage/v1")), "--quiet"], r"record\(s\) failed .*rerun the same command", status=1),
    Case("api-bad-prompt", "api", "a prompt line without 'prompt' or 'messages'", lambda c: ["generate", str(c.api(prompts=[str(c.file("p.jsonl", '{"question": "hi"}\n'))]))], r"p.jsonl:1: needs a string 'prompt' or a non-empty list 'messages'"),
    Case("api-corrupt-output", "api", "a damaged line in the output being resumed", _generate_after_corrupt_output, r"data.jsonl:2: corrupt line"),
    # ---------------------------------------------------------------- issue 17: checked before anything loads
    Case("cli-eval-seq-len-1", "cli", "`eval --seq-len 1` (no next token to predict)", lambda c: ["eval", "--teacher", "t", "--student", "s", "--data", "d", "--seq-len", "1"], r"argument --seq-len: must be at least 2 \(got 1\)"),
    Case("cli-eval-max-blocks-0", "cli", "`eval --max-blocks 0`", lambda c: ["eval", "--teacher", "t", "--student", "s", "--data", "d", "--max-blocks", "0"], r"argument --max-blocks: must be at least 1 \(got 0\)"),
    Case("cli-eval-batch-size-0", "cli", "`eval --batch-size 0`", lambda c: ["eval", "--teacher", "t", "--student", "s", "--data", "d", "--batch-size", "0"], r"argument --batch-size: must be at least 1 \(got 0\)"),
    Case("cli-eval-batch-size-negative", "cli", "`eval --batch-size -1` (was: perplexity 1.0 over no tokens)", lambda c: ["eval", "--teacher", "t", "--student", "s", "--data", "d", "--batch-size=-1"], r"argument --batch-size: must be at least 1 \(got -1\)"),
    Case("config-duplicate-key", "config", "a key given twice in one section (YAML keeps the last)", lambda c: ["distill", str(c.file("r.yaml", "train:\n  max_steps: 5\n  lr: 0.001\n  max_steps: 50\n"))], r"r.yaml:4: key 'max_steps' is given twice in one section \(first at line 2\)"),
    Case("config-duplicate-section", "config", "a second `teacher:` section", lambda c: ["distill", str(c.file("r.yaml", "teacher:\n  source: a\ntrain:\n  max_steps: 2\nteacher:\n  source: b\n"))], r"r.yaml:5: key 'teacher' is given twice in one section \(first at line 1\)"),
    Case("config-recipe-not-utf8", "config", "a recipe that is not UTF-8", lambda c: ["distill", str(c.file("r.yaml", "train:\n  output_dir: caf\xe9\n".encode("latin-1")))], r"r.yaml:2: not UTF-8 text \(byte offset 24: 0xe9\)"),
    Case("config-recipe-is-folder", "config", "a folder given as the recipe", lambda c: ["distill", str(c.tmp)], r"recipe '.*' is a folder, not a YAML file"),
    Case("config-adam-betas", "config", "`train.adam_betas` out of [0, 1) (checked before the teacher, which is missing here)", lambda c: ["distill", str(c.recipe(teacher={"source": str(c.tmp / "missing")}, train={"adam_betas": [0.9, 1.5]}))], r"config key 'train.adam_betas.1': Input should be less than 1 \(got 1.5\)"),
    Case("config-qat-group-size", "config", "`qat.group_size=0` (was: an error when QAT starts, near the end)", lambda c: ["distill", str(c.recipe()), "qat.enabled=true", "qat.group_size=0"], r"config key 'qat.group_size': Input should be greater than 0"),
    Case("config-qat-last-steps", "config", "a negative `qat.last_steps`", lambda c: ["distill", str(c.recipe()), "qat.last_steps=-5"], r"config key 'qat.last_steps': Input should be greater than or equal to 0"),
    Case("config-output-dir-empty", "config", "`train.output_dir=` (was: the run written into the current folder)", lambda c: ["distill", str(c.recipe()), "train.output_dir="], r"config key 'train.output_dir': .*must name a folder"),
    Case("config-not-finite", "config", "an infinite learning rate", lambda c: ["distill", str(c.recipe()), "train.lr=.inf"], r"config key 'train.lr': Input should be a finite number"),
    Case("config-student-model-typo", "config", "a misspelt key inside `student.model` (was: silently ignored)", lambda c: ["distill", str(c.recipe(student={"model": {**SMALL, "hidden_sise": 48}}))], r"config key 'student.model.hidden_sise' is not a setting of llama/[a-z0-9_/]+ configs \(did you mean 'student.model.hidden_size'\?\)"),
    Case("config-student-model-size", "config", "a negative size inside `student.model`", lambda c: ["distill", str(c.recipe(student={"model": {**SMALL, "num_hidden_layers": -1}}))], r"config key 'student.model.num_hidden_layers': must be a positive whole number \(got -1\)"),
    Case("config-output-is-input", "config", "`train.output_dir` is the teacher's own folder", lambda c: ["distill", str(c.recipe(train={"output_dir": str(make_teacher(c.base))}))], r"train.output_dir '.*teacher' is the teacher folder"),
    Case("data-lone-surrogate", "data", "a JSONL line with a lone surrogate (`\\ud800`)", lambda c: c.data("d.jsonl", '{"text": "ok"}\n{"text": "bad \\ud800 here"}\n'), r"d.jsonl:2: field 'text' holds a lone surrogate \\ud800 at character 4"),
    Case("data-chat-surrogate", "data", "a chat message with a lone surrogate", lambda c: c.data("c.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udc80"}]}\n'), r"c.jsonl:1: messages\[1\].content holds a lone surrogate \\udc80"),
    Case("model-teacher-truncated", "model", "a truncated teacher `model.safetensors` (distill)", lambda c: ["distill", str(c.recipe(teacher={"source": str(_truncated(_copy_teacher(c, "t-cut")))}))], r"teacher: weights file '.*t-cut/model.safetensors' has \d+ bytes"),
    Case("model-teacher-pickle-only", "model", "a teacher whose weights exist only as `pytorch_model.bin`", lambda c: ["distill", str(c.recipe(teacher={"source": str(_pickle_only(_copy_teacher(c, "t-pkl")))}))], r"teacher '.*t-pkl' holds its weights only as a pickle \(pytorch_model.bin\): distillery never unpickles"),
    Case("model-pretrained-pickle-only", "model", "`student.pretrained` holding only a pickle", lambda c: ["distill", str(c.recipe(student={"init": "pretrained", "pretrained": str(_pickle_only(_student(c))), "model": {}}))], r"student.pretrained '.*student' holds its weights only as a pickle"),
    Case("model-pretrained-larger", "model", "a pretrained student larger than the teacher", lambda c: ["distill", str(c.recipe(student={"init": "pretrained", "pretrained": str(_student(c, hidden=96, layers=2)), "model": {}}))], r"student.pretrained '.*' has [\d.]+M parameters, more than its teacher \([\d.]+M\)"),
    Case("model-eval-truncated", "model", "`eval` with a truncated student", lambda c: _eval(c, student=_truncated(_student(c))), r"student: weights file '.*model.safetensors' has \d+ bytes"),
    Case("model-eval-pickle-teacher", "model", "`eval` with a pickle-only teacher", lambda c: ["eval", "--teacher", str(_pickle_only(_copy_teacher(c, "t-pkl"))), "--student", str(_student(c)), "--data", "demo:milton"], r"teacher '.*t-pkl' holds its weights only as a pickle"),
    Case("model-export-truncated", "model", "`export` of a truncated student", lambda c: ["export", str(_truncated(_student(c))), str(c.tmp / "s.gguf")], r"student: weights file '.*' has \d+ bytes"),
    Case("model-quantize-truncated", "model", "`quantize` of a truncated student", lambda c: ["quantize", str(_truncated(_student(c))), "--out", str(c.tmp / "q")], r"student: weights file '.*' has \d+ bytes"),
    Case("model-cache-truncated", "model", "`cache` with a truncated teacher", lambda c: ["cache", str(c.recipe(teacher={"source": str(_truncated(_copy_teacher(c, "t-cut")))})), "--out", str(c.tmp / "cache")], r"teacher: weights file '.*t-cut/model.safetensors' has \d+ bytes"),
    Case("model-bench-truncated", "model", "`bench` of a truncated model", lambda c: ["bench", str(_truncated(_student(c)))], r"model: weights file '.*' has \d+ bytes"),
    Case("cache-manifest-missing-key", "cache", "a cache manifest missing a key", lambda c: _edit_manifest(c, lambda m: m.pop("k")), r"manifest.json: the manifest has no 'k'"),
    Case("cache-path-escape", "cache", "a cache manifest naming a file outside the cache (`../../`)", lambda c: _edit_manifest(c, lambda m: m["shards"][0].update(file="../../corpus.txt")), r"its manifest names the file '../../corpus.txt', outside the cache folder; refusing to read it"),
    Case("cache-other-teacher", "cache", "a cache written by another teacher than the recipe's", lambda c: ["distill", str(c.recipe(teacher={"kind": "cache", "cache_path": str(_cache(c)), "source": str(_copy_teacher(c, "teacher-b"))}))], r"was written by teacher 'teacher', but teacher.source names 'teacher-b'"),
    # ---------------------------------------------------------------- runs, resumes and outputs
    Case("run-resume-other-settings", "run", "`--resume` with another loss", lambda c: ["distill", str(_ran(c)), "--resume", "loss.kd=jsd"], r"--resume: .*step-00000001 was written with other settings \(loss.kd: 'forward_kl' in the run, 'jsd' now\)"),
    Case("run-resume-drops-overrides", "run", "`distill R train.max_steps=1 loss.kd=jsd`, then `distill R --resume` (was: continued as forward KL)", lambda c: ["distill", str(_ran(c, "loss.kd=jsd")), "--resume"], r"--resume: .* \(loss.kd: 'jsd' in the run, 'forward_kl' now\); resume with the run's own settings \(distill .*config.yaml --resume\)"),
    Case("run-resume-other-student", "run", "`--resume` with another student shape", lambda c: ["distill", str(_ran(c)), "--resume", "student.model.hidden_size=48"], r"--resume: .*student.model: "),
    Case("run-resume-damaged", "run", "`--resume` when every checkpoint is damaged", _all_checkpoints_damaged, r"checkpoint .*step-00000001: model.safetensors has \d+ bytes.*: no checkpoint to resume from"),
    Case("run-resume-bad-metrics", "run", "`--resume` with a `metrics.jsonl` line of another shape", _bad_metrics, r"metrics.jsonl:\d+: not a metrics record of distill \(no whole-number 'step'\)"),
    Case("run-diverged", "run", "a diverging run (`train.lr=1e10`; was: a student of huge weights, exit 0)", lambda c: ["distill", str(c.recipe()), "train.lr=1e10", "train.warmup_steps=0", "train.max_grad_norm=0"], r"step \d+: .*(diverged|loss is nan).*(last good checkpoint: none|last good checkpoint: none\))"),
    Case("run-locked", "run", "a second run into a folder another run is writing", _locked, r"train.output_dir '.*out' is being written by another run \(process 4242 on other-host holds .*\.lock\)"),
    Case("run-report-bad-metrics", "run", "`report` on a `metrics.jsonl` line of another shape", lambda c: _report_run(c, '{"step": 2, "loss": "low"}\n'), r"metrics.jsonl:2: not a metrics record of distill \('loss' is missing or not a number\)"),
    Case("run-report-over-input", "run", "`report RUN --out RUN/metrics.jsonl`", lambda c: [*_report_run(c, ""), "--out", str(c.tmp / "run" / "metrics.jsonl")], r"report --out: the output '.*metrics.jsonl' would write over the run's metrics.jsonl"),
    Case("run-export-over-input", "run", "`export STUDENT STUDENT/model.safetensors`", lambda c: ["export", str(_student(c)), str(c.tmp / "student" / "model.safetensors")], r"export: the output '.*student/model.safetensors' would write over the student folder"),
    Case("run-eval-json-over-input", "run", "`eval --json STUDENT/model.safetensors`", lambda c: _eval(c, "--json", str(c.tmp / "student" / "model.safetensors")), r"eval --json: the output .* would write over the student"),
    Case("run-gguf-over-other-file", "run", "`export STUDENT notes.txt` over a file that is not GGUF (was: the file replaced)", lambda c: ["export", str(_student(c)), str(c.file("notes.txt", "my notes"))], r"GGUF output '.*notes.txt' exists and is not a GGUF file"),
    Case("run-onnx-into-foreign", "run", "`export --format onnx` into another model's folder (was: its config and tokenizer replaced, the folder moved aside if the check failed)", lambda c: ["export", str(_student(c)), str(c.file("other/config.json", "{}").parent), "--format", "onnx"], r"ONNX output '.*other' holds files that are not an ONNX export's \(config.json\)"),
    Case("run-quantize-into-foreign", "run", "`quantize --out` another model's folder (was: its config.json and weights replaced)", lambda c: ["quantize", str(_student(c)), "--out", str(c.file("other/config.json", "{}").parent)], r"quantize --out '.*other' holds files that are not a quantized student's \(config.json\)"),
    Case("run-quantize-over-input", "run", "`quantize STUDENT --out STUDENT`", lambda c: ["quantize", str(_student(c)), "--out", str(c.tmp / "student")], r"quantize --out: the output '.*student' would write over the student folder"),
]
