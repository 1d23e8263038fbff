"""``onpolicy.server``: where student rollouts come from when ``onpolicy.rollout: server``.

An OpenAI-compatible ``/v1/completions`` endpoint (``stillroom serve-teacher --allow-reload``, or vLLM)
samples the student's continuations from token-id prompts; the run keeps the server's weights in step with
the student by writing them as a Hugging Face folder and asking the server to load it
(:mod:`stillroom.methods.rollout_server`, docs/ONPOLICY.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from stillroom.config.core import RemoteConfig, Strict

if TYPE_CHECKING:
    from stillroom.config.schema import RunConfig


class RolloutServerConfig(Strict):
    """The rollout server and how the run syncs the student's weights to it."""

    url: str | None = Field(
        None, description="Base URL of the OpenAI-compatible server, e.g. http://127.0.0.1:8001/v1 (needed with "
        "onpolicy.rollout=server)."
    )
    model: str | None = Field(
        None, description="Model name sent in requests (the server's served model name; null: the server's first)."
    )
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the server's API key (never the key itself)."
    )
    concurrency: int = Field(4, ge=1, description="Completion requests in flight at most (one request per row).")
    timeout_s: float = Field(
        120.0, gt=0, description="Seconds to wait for one answer (a weight reload answers when the load is done)."
    )
    max_retries: int = Field(3, ge=0, description="Retries after 429, 5xx, timeouts or broken connections.")
    reload: Literal["checkpoint", "restart"] = Field(
        "checkpoint",
        description="checkpoint: every reload_every steps the run writes the student as a Hugging Face folder "
        "(weights_dir) and asks the server to load it (POST /v1/load_weights, which `stillroom serve-teacher "
        "--allow-reload` offers), then checks the server reports those weights; restart: the run writes the folder "
        "on the same schedule but restarting the server on it is the user's job (vLLM has no stable reload "
        "endpoint); the run cannot check which weights such a server serves and says so.",
    )
    reload_every: int = Field(
        1, ge=1, description="Optimizer steps between weight syncs (the first rollout always syncs first). For a "
        "resume to repeat the uninterrupted run's samples, make train.save_every a multiple of it."
    )
    weights_dir: str | None = Field(
        None, description="Folder the student's weights are written to for the server (replaced atomically each "
        "sync; it must be readable by the server at the same path); null: <run folder>/rollout_weights."
    )

    def check_run(self, run: "RunConfig") -> None:
        """Refuse, before any model loads, a server rollout that cannot work."""
        if not self.url:
            raise ValueError("onpolicy.rollout=server needs onpolicy.server.url, e.g. http://127.0.0.1:8001/v1")
        if run.student.quantize is not None:
            raise ValueError("onpolicy.rollout=server writes the student as a plain Hugging Face folder for the "
                             "server; a quantized student (student.quantize) cannot be synced that way: use "
                             "onpolicy.rollout=local")
        if run.onpolicy is not None and run.onpolicy.student_weight <= 0:
            raise ValueError("onpolicy.rollout=server samples student continuations, but onpolicy.student_weight is 0; "
                             "give it a weight > 0 or use onpolicy.rollout=local")

    def client_config(self) -> RemoteConfig:
        """The settings of the one HTTP client (:class:`stillroom.teachers.http.OpenAIClient`)."""
        return RemoteConfig(url=self.url, model=self.model, api_key_env=self.api_key_env, concurrency=self.concurrency,
                            timeout_s=self.timeout_s, max_retries=self.max_retries)
