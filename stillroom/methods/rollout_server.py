"""Student rollouts sampled by an OpenAI-compatible server (``onpolicy.rollout: server``).

:class:`ServerRollout` is the other sampler behind :meth:`stillroom.methods.onpolicy.OnPolicySource.generate`'s
seam: the same prompts, per-row budgets and stop tokens go in, continuation token ids come out, and the rest
of the on-policy path (targets, teacher scoring, ``onpolicy.jsonl``, ``generate_s``) is unchanged.

Requests: one ``POST /v1/completions`` per row with the prompt as a list of token ids (as vLLM and
``stillroom serve-teacher`` accept), ``max_tokens`` = the row's budget, ``temperature`` (0: greedy) and
``top_p``, ``seed`` = ``derive_seed("onpolicy-sample", run seed, step, micro-batch, rank, row)`` so a
resumed run asks for the same samples, ``stop_token_ids`` = the local path's EOS ids (``ignore_eos`` when
``onpolicy.stop_at_eos`` is off) and ``return_token_ids: true``, vLLM's request field (vLLM >= 0.10.2, PR
vllm-project/vllm#22587) that puts the generated ``token_ids`` on each choice; our server honours it too.
The ids end with the stop token when one ended the row, as the local sampler's do. A server samples the
same tokens for the same seed only with the same weights (vLLM: and the same batch-invariant kernels).

Weights: before the first rollout, and again once ``reload_every`` optimizer steps have passed since the
last sync, the student is written as a Hugging Face folder (safetensors, LoRA merged) to ``weights_dir``,
renamed into place so the server never reads half of one. With ``reload: checkpoint`` the server is
asked to load it (``POST /v1/load_weights``) and must then report the folder's digest
(:func:`stillroom.teachers.reload.folder_digest`) in its answer, in ``/v1/models`` and as every
completion's ``system_fingerprint``; anything else raises :class:`StaleWeightsError`. With
``reload: restart`` the folder is only written (restarting the server on it is the user's job) and the
run cannot check what the server serves; it says so once.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from stillroom.config.rollout import RolloutServerConfig
from stillroom.data.seeds import derive_seed
from stillroom.models.lora import merge_lora, unwrap
from stillroom.teachers.http import OpenAIClient, RemoteError
from stillroom.teachers.reload import folder_digest


class RolloutServerError(RuntimeError):
    """The rollout server cannot serve this run's student rollouts; the message says where and how to fix it."""


class StaleWeightsError(RolloutServerError):
    """The rollout server does not serve the student weights the run last wrote for it."""


def row_seed(seed: int, step: int, micro_index: int, rank: int, row: int) -> int:
    """The ``seed`` sent for ``row`` of micro-batch ``micro_index`` of step ``step`` on process ``rank``."""
    return derive_seed("onpolicy-sample", seed, step, micro_index, rank, row)


def export_student(model: torch.nn.Module, tokenizer: Any, folder: Path, *, lora: bool) -> str:
    """Write ``model`` (adapters merged into a copy when ``lora``) and ``tokenizer`` as a Hugging Face folder of
    safetensors at ``folder``, through a sibling temporary folder renamed into place; return its digest."""
    plain = merge_lora(copy.deepcopy(model)) if lora else unwrap(model)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder_digest(folder)


class ServerRollout:
    """Student continuations from the rollout server, with the weights synced as the module docstring says."""

    def __init__(
        self,
        cfg: RolloutServerConfig,
        *,
        student: torch.nn.Module,
        tokenizer: Any,
        lora: bool,
        weights_dir: Path,
        seed: int,
        rank: int = 0,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        self.client = OpenAIClient(cfg.client_config(), key="onpolicy.server")
        self.student, self.tokenizer, self.lora = student, tokenizer, lora
        self.weights_dir = Path(weights_dir).resolve()
        self.seed, self.rank, self.log = int(seed), int(rank), log
        self.model_name = cfg.model
        self.synced_step: int | None = None
        self.weights: str | None = None
        """Digest of the folder last written for the server."""

    @property
    def where(self) -> str:
        return f"onpolicy.server ({self.client.shown_base})"

    def check(self) -> None:
        """Before step 0: the model is served with the student's tokenizer and (reload=checkpoint) can reload."""
        from stillroom.models.vocab import tokenizer_hash

        try:
            entry = self.client.check_server(tokenizer_hash(self.tokenizer)) or {}
        except RemoteError as err:
            raise RolloutServerError(f"{self.where}: {err}") from None
        self.model_name = self.cfg.model or entry.get("id")
        if self.cfg.reload == "checkpoint" and entry.get("reload") is False:
            raise RolloutServerError(
                f"{self.where}: the server refuses weight reloads (it was started without --allow-reload); restart "
                "it with `stillroom serve-teacher MODEL --allow-reload`, or set onpolicy.server.reload=restart")
        if self.cfg.reload == "restart":
            self.log(f"onpolicy: reload=restart: the student is written to {self.weights_dir} every "
                     f"{self.cfg.reload_every} step(s); restarting the server on it is up to you, and the run cannot "
                     "check which weights the server samples with")

    def sync(self, step: int) -> None:
        """Write the student for the server and (reload=checkpoint) have the server load it and confirm it."""
        t0, first = time.perf_counter(), self.synced_step is None
        self.weights_dir.parent.mkdir(parents=True, exist_ok=True)
        digest = export_student(self.student, self.tokenizer, self.weights_dir, lora=self.lora)
        self.weights, self.synced_step = digest, step
        if self.cfg.reload == "checkpoint":
            try:
                answer = self.client.request("POST", "/load_weights", {"path": str(self.weights_dir)})
                served = (self.client.check_server() or {}).get("weights")
            except RemoteError as err:
                hint = (" (the server has no /v1/load_weights endpoint: vLLM has none; use "
                        "onpolicy.server.reload=restart)" if "HTTP 404" in str(err) else "")
                raise RolloutServerError(f"{self.where}: weight sync before step {step + 1}: {err}{hint}") from None
            for what, got in (("the load answer", answer.get("weights")), ("GET /v1/models", served)):
                if got != digest:
                    raise StaleWeightsError(f"{self.where}: after loading {self.weights_dir}, {what} reports weights "
                                            f"{str(got)[:12]}, not the student's {digest[:12]} (step {step})")
        if first or self.cfg.reload_every > 1:  # every step's sync would drown the log
            self.log(f"onpolicy: student of step {step} synced to {self.where} as {self.weights_dir} "
                     f"({digest[:12]}, {time.perf_counter() - t0:.1f} s)")

    def sample(
        self,
        prompts: Sequence[list[int]],
        budgets: Sequence[int],
        *,
        step: int,
        micro_index: int,
        sampling_temperature: float,
        top_p: float,
        stop_ids: Sequence[int] | None,
    ) -> list[list[int]]:
        """The continuation ids of every prompt (row ``i`` at most ``budgets[i]`` tokens; 0 temperature: greedy);
        ``stop_ids``: the ids that end a row (kept), None: never stop early."""
        if self.synced_step is None or step - self.synced_step >= self.cfg.reload_every:
            self.sync(step)
        out: dict[int, list[int]] = {}

        def ask(row: int) -> Any:
            payload = {"prompt": list(prompts[row]), "max_tokens": int(budgets[row]), "n": 1,
                       "temperature": sampling_temperature, "top_p": top_p,
                       "seed": row_seed(self.seed, step, micro_index, self.rank, row), "return_token_ids": True,
                       "stop_token_ids": list(stop_ids or []), "ignore_eos": stop_ids is None}
            if self.model_name is not None:
                payload["model"] = self.model_name
            try:
                return self.client.request("POST", "/completions", payload)
            except RemoteError as err:
                raise RolloutServerError(f"{self.where}: rollout of step {step + 1}: {err}") from None

        self.client.parallel(ask, list(range(len(prompts))),
                             lambda row, body: out.__setitem__(row, self._token_ids(body, row, int(budgets[row]))))
        return [out[row] for row in range(len(prompts))]

    def _token_ids(self, body: Any, row: int, budget: int) -> list[int]:
        """Row ``row``'s continuation ids from one completion answer, checked (shape, range, weights served)."""
        choices = body.get("choices") if isinstance(body, dict) else None
        ids = choices[0].get("token_ids") if isinstance(choices, list) and len(choices) == 1 \
            and isinstance(choices[0], dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise RolloutServerError(
                f"{self.where}: the completion of row {row} carries no `token_ids` list; the server must honour "
                "`return_token_ids` (vLLM >= 0.10.2, stillroom serve-teacher)")
        vocab = len(self.tokenizer)
        if len(ids) > budget or any(not 0 <= i < vocab for i in ids):
            raise RolloutServerError(f"{self.where}: the completion of row {row} has {len(ids)} ids (asked at most "
                                     f"{budget}) or ids outside [0, {vocab})")
        if self.cfg.reload == "checkpoint" and body.get("system_fingerprint") != self.weights:
            raise StaleWeightsError(
                f"{self.where}: a rollout came from weights {str(body.get('system_fingerprint'))[:12]}, not the "
                f"student's {str(self.weights)[:12]} written at step {self.synced_step} (was the server reloaded "
                "or restarted by someone else?)")
        return ids
