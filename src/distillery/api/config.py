"""Typed recipe for `distillery generate`: an OpenAI-compatible teacher turns prompts into a chat data set.

:class:`ApiConfig` is self-contained (a standalone YAML file validates against it) and is meant to be
nested into ``RunConfig`` as ``api:``. Unknown keys are errors, like everywhere in distillery.

The API key is never part of the config: ``api_key_env`` names the environment variable that holds it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError, BaseModel, ConfigDict, Field, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(_Section):
    """How the teacher samples. Every field here (except ``n``) is part of each record's id."""

    sample_temperature: float = Field(0.7, ge=0.0, le=2.0, description="Sampling temperature sent as the API's `temperature` (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    max_tokens: int = Field(256, gt=0, description="Most tokens generated per answer (also the worst case counted against `tpm`).")
    n: int = Field(1, gt=0, description="Samples per prompt. Each sample is its own record (own id, own request), so raising n later only adds the new samples.")
    stop: list[str] = Field(default_factory=list, description="Stop sequences (at most 4 for most servers).")
    seed: int | None = Field(None, description="Sampling seed where the server supports it; sample i is sent seed + i so samples differ yet are reproducible.")
    logprobs: bool = Field(False, description="Ask for the log-probability of each generated token (stored with the record).")
    top_logprobs: int = Field(0, ge=0, le=20, description="Also store this many most likely alternatives per token (needs logprobs: true); feeds sparse KD.")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="Server-specific request fields passed through verbatim (e.g. vLLM's top_k). Part of the record id.")

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    def id_fields(self) -> dict[str, Any]:
        """The settings that change what an answer is (hashed into record ids); ``n`` is excluded."""
        d = self.model_dump(mode="json")
        d.pop("n")
        return d


class ApiConfig(_Section):
    """Where the served teacher is, what to ask it, how hard to push it, and where the answers go."""

    base_url: str | list[str] = Field("http://127.0.0.1:8080/v1", description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM), https://generativelanguage.googleapis.com/v1beta/openai/ (Gemini); or a list of endpoints serving the same model: attempts go round-robin, so a retry lands on the next server. Not part of the record id.")
    model: str = Field("teacher", description="Model name sent with each request. Part of the record id.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Name of the environment variable holding the API key. The key itself never goes into a recipe, output, log or error message.")
    prompts: list[str] = Field(default_factory=list, description="Prompt files: .jsonl with `prompt` (text) or `messages` (chat) per line, or text files with one prompt per line.")
    system_prompt: str | None = Field(None, description="System message put before every prompt that has none. Part of the record id.")
    output: str = Field("data/generated.jsonl", description="Chat data set written here (JSONL, one record per line, appended durably); `distill` reads it as data.train.")
    failures: str | None = Field(None, description="Failed requests with their reason (JSON lines); default: `<output>.failures`. Rerunning retries them.")
    retry_failed: bool = Field(True, description="On rerun, retry ids listed in the failures file (false: skip them and keep them listed).")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    concurrency: int = Field(8, gt=0, description="Most requests in flight at once.")
    rpm: float | None = Field(None, gt=0, description="Requests-per-minute limit (every attempt counts); None = no limit.")
    tpm: float | None = Field(None, gt=0, description="Tokens-per-minute limit (prompt estimate + max_tokens reserved, settled to actual usage); None = no limit.")
    max_retries: int = Field(6, ge=0, description="Retries per record on 429, 5xx, timeouts and dropped connections before it is recorded as failed.")
    backoff_base: float = Field(0.5, gt=0, description="First back-off delay in seconds; doubles each retry, with jitter.")
    backoff_max: float = Field(60.0, gt=0, description="Longest back-off delay in seconds (a server's Retry-After may ask for more, up to max_retry_after).")
    max_retry_after: float = Field(600.0, gt=0, description="A Retry-After longer than this many seconds fails the record instead of waiting.")
    timeout: float = Field(120.0, gt=0, description="Seconds per request before it counts as timed out (and is retried).")
    price_in_per_1m: float | None = Field(None, ge=0, description="Price per 1M prompt tokens (any currency) for the cost estimate.")
    price_out_per_1m: float | None = Field(None, ge=0, description="Price per 1M completion tokens for the cost estimate.")
    fsync: bool = Field(True, description="fsync after every record (exactly-once across power loss and kill -9). Off only for throwaway runs.")
    progress_every: float = Field(10.0, ge=0, description="Seconds between progress log lines (0 = none).")

    @field_validator("base_url")
    @classmethod
    def _urls(cls, v: str | list[str]) -> str | list[str]:
        urls = [v] if isinstance(v, str) else v
        if not urls or any(not u.startswith(("http://", "https://")) for u in urls):
            raise ValueError("needs one or more http(s):// URLs")
        return v

    def base_urls(self) -> list[str]:
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)

    @field_validator("api_key_env")
    @classmethod
    def _looks_like_env_name(cls, v: str) -> str:
        # Guard against the most damaging mistake: pasting the key itself here (it would then be in the recipe).
        if not v or not all(c.isalnum() or c == "_" for c in v) or v[0].isdigit():
            raise ValueError("must be the NAME of an environment variable (letters, digits, _), not the key itself")
        mixed = any(c.islower() for c in v) and any(c.isupper() for c in v) and any(c.isdigit() for c in v)
        if mixed and len(v) >= 20:  # looks like random key material (e.g. 'AIzaSy...'), not a name
            raise ValueError("looks like an API key, not the NAME of an environment variable holding one")
        return v

    def failures_path(self) -> str:
        return self.failures or f"{self.output}.failures"

    def summary_path(self) -> str:
        return f"{self.output}.summary.json"


SECRET_LIKE = ("api_key_env",)  # never echo what was given for these (it may be a pasted key)


def validation_message(err: ValidationError, prefix: str) -> str:
    """One line naming the first offending key; the offending value is shown unless it may be secret."""
    e = err.errors()[0]
    key = ".".join([prefix, *(str(p) for p in e["loc"])])
    if e["type"] == "extra_forbidden":
        return f"config key '{key}' is not a known setting"
    got = e.get("input")
    show = not isinstance(got, (dict, list)) and not any(str(p) in SECRET_LIKE for p in e["loc"])
    return f"config key '{key}': {e['msg']}" + (f" (got {got!r})" if show else "")
