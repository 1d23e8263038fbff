"""The Batch contract and the one place where the causal shift happens.

A tokenized example is a list of token ids plus a per-token ``target`` flag
(True where the model must learn to produce that token: every token of plain
text, only assistant/completion tokens of chat or prompt/completion records).

:func:`collate` turns examples into a :class:`Batch` whose ``target_ids`` are
already shifted: ``target_ids[b, t]`` is the token that the logits at position
``t`` predict, ``-100`` where nothing is learned (prompt, padding, the last
position). Everything downstream (losses, teacher stores, metrics) compares
position ``t`` with position ``t`` and never shifts again.

:class:`ExampleSampler` draws the indices of each micro-batch: deterministic,
resumable, rank-aware, whole groups at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stillroom.data.images import ImageRef, stack_pixels

IGNORE = -100


@dataclass
class Example:
    """One tokenized sequence.

    ``input_ids``: token ids; ``target``: same length, True where the token is a
    learning target; ``uid``: a stable identity (hash of the source record and
    the block index) used for held-out splits and teacher-store alignment;
    ``domain``: optional domain label; ``n_bytes``: UTF-8 bytes of the text the
    target tokens cover (for bits per byte); ``role``: which sequence of its record's
    group this is, for methods that train on several sequences per record (e.g.
    ``predict`` / ``explain``, ``chosen`` / ``rejected``), else ``None``; ``image``: the image of a
    vision-language record (its file, read into ``Batch.pixel_values`` when collated), else ``None``;
    ``doc_lens``: for a block packed with ``data.attention: within_documents``, the lengths of its documents
    in order (they sum to ``len(input_ids)``; each attends only to itself and restarts its positions at 0, and
    a later document's first token is never a target, as position 0 of an unpacked sequence), else ``None``.
    """

    input_ids: list[int]
    target: list[bool]
    uid: str
    domain: str | None = None
    n_bytes: int = 0
    meta: dict = field(default_factory=dict)
    role: str | None = None
    image: ImageRef | None = None
    doc_lens: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.target):
            raise ValueError(f"example {self.uid}: {len(self.input_ids)} ids but {len(self.target)} target flags")
        if self.doc_lens is not None:
            if min(self.doc_lens, default=0) < 1 or sum(self.doc_lens) != len(self.input_ids):
                raise ValueError(f"example {self.uid}: doc_lens {self.doc_lens} must be positive and sum to its "
                                 f"{len(self.input_ids)} tokens")
            if any(self.target[s] for s in doc_starts(self.doc_lens)[1:]):  # flag 0 is never learned
                raise ValueError(f"example {self.uid}: a packed document's first token is a target; it would be "
                                 "learned from the document before it (clear its target flag)")


def doc_starts(doc_lens: list[int]) -> list[int]:
    """The token offsets where the documents of lengths ``doc_lens`` begin (``[0, l0, l0 + l1, ...]``)."""
    starts, at = [], 0
    for n in doc_lens:
        starts.append(at)
        at += n
    return starts


@dataclass
class Batch:
    """Integer tensors, right-padded. Shapes: ``[B, T]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_ids: torch.Tensor
    uids: list[str]
    n_bytes: torch.Tensor
    """``[B]`` UTF-8 bytes covered by each row's target tokens."""
    domains: list[str | None] = field(default_factory=list)
    roles: list[str | None] = field(default_factory=list)
    """Per row: the :attr:`Example.role` it came from."""
    target_weight: torch.Tensor | None = None
    """Optional ``[B, T]`` float: a per-target-token weight on every logit loss term (``None`` = 1).

    Set by the training loop from a method's ``weight_targets`` (step-by-step's per-task
    normalisation, REDI's signed, length-normalised pair weights), after the loop has counted
    the step's target tokens ``N``; the loop divides by ``N``, so a method whose objective is
    ``sum(w * l) / N`` chooses ``w`` accordingly."""
    pixel_values: torch.Tensor | None = None
    """Optional ``[B, 3, H, W]`` float: each row's image, normalised for the model's vision tower (a
    vision-language model's prompt holds its image tokens); ``None`` for text-only batches."""
    position_ids: torch.Tensor | None = None
    """Optional ``[B, T]`` long, set when a row holds packed documents (:attr:`Example.doc_lens`): each
    document's positions restart at 0, and so do the padding tail's (a run of its own, so no query row of the
    attention mask is empty). ``None``: positions ``0..T-1`` and one sequence per row, as without packing.
    ``attention_mask`` stays the ``[B, T]`` padding mask for every other reader."""

    def model_inputs(self, varlen: bool = False) -> dict[str, torch.Tensor]:
        """The keyword arguments of a forward pass on this batch: ids, mask and, when set, ``pixel_values``.

        A batch of packed documents (``position_ids`` set) gives its ``position_ids`` and, in place of the
        padding mask, the additive block-diagonal causal mask ``[B, 1, T, T]`` of :func:`document_mask`
        (Hugging Face models take a 4D mask as it is, for eager and sdpa attention alike; a boolean one is
        misread by eager attention). ``varlen=True`` (flash-attention models) gives ``position_ids`` and no
        mask: flash-attention finds the documents where the positions restart.
        """
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
            if varlen:
                del inputs["attention_mask"]
            else:
                inputs["attention_mask"] = document_mask(self.position_ids)
        if self.pixel_values is not None:
            inputs["pixel_values"] = self.pixel_values
        return inputs

    @property
    def loss_mask(self) -> torch.Tensor:
        """``[B, T]`` bool: True where a token counts."""
        return self.target_ids != IGNORE

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum())

    def select(self, rows: list[int]) -> "Batch":
        """The sub-batch of ``rows`` (same width ``T``), every per-row field carried (positions, images, weights)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx.to(t.device)]

        def pick(values: list) -> list:
            return [values[i] for i in rows] if values else []

        return Batch(input_ids=take(self.input_ids), attention_mask=take(self.attention_mask),
                     target_ids=take(self.target_ids), uids=pick(self.uids), n_bytes=take(self.n_bytes),
                     domains=pick(self.domains), roles=pick(self.roles), target_weight=take(self.target_weight),
                     pixel_values=take(self.pixel_values), position_ids=take(self.position_ids))

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            target_ids=self.target_ids.to(device),
            uids=self.uids,
            n_bytes=self.n_bytes.to(device),
            domains=self.domains,
            roles=self.roles,
            target_weight=None if self.target_weight is None else self.target_weight.to(device),
            pixel_values=None if self.pixel_values is None else self.pixel_values.to(device),
            position_ids=None if self.position_ids is None else self.position_ids.to(device),
        )


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` float32 additive attention mask (0: attend, the float32 minimum: not) from ``[B, T]``
    packed positions: query ``t`` sees key ``s <= t`` of its own document, a document being a run of positions
    that starts at 0. Float32 (not bool) because eager attention adds the mask to its scores."""
    doc_bt = (position_ids == 0).cumsum(dim=-1)
    t = position_ids.shape[-1]
    causal_tt = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed_btt = (doc_bt[:, :, None] == doc_bt[:, None, :]) & causal_tt
    mask = torch.zeros(allowed_btt.shape, dtype=torch.float32, device=position_ids.device)
    return mask.masked_fill_(~allowed_btt, torch.finfo(torch.float32).min)[:, None]


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad ``examples`` and build shifted targets (the only causal shift); with packed documents in any
    row (:attr:`Example.doc_lens`), also ``position_ids`` (:attr:`Batch.position_ids`)."""
    if not examples:
        raise ValueError("collate: empty list of examples")
    width = max(len(e.input_ids) for e in examples)
    bsz = len(examples)
    input_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    attention = torch.zeros((bsz, width), dtype=torch.long)
    targets = torch.full((bsz, width), IGNORE, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids = torch.tensor(ex.input_ids, dtype=torch.long)
        input_ids[i, :n] = ids
        attention[i, :n] = 1
        if n > 1:
            learn_next = torch.tensor(ex.target[1:], dtype=torch.bool)
            targets[i, : n - 1] = torch.where(learn_next, ids[1:], torch.full_like(ids[1:], IGNORE))
    packed = any(e.doc_lens is not None for e in examples)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=packed_positions(examples, width) if packed else None,
        target_ids=targets,
        uids=[e.uid for e in examples],
        n_bytes=torch.tensor([e.n_bytes for e in examples], dtype=torch.long),
        domains=[e.domain for e in examples],
        roles=[e.role for e in examples],
        pixel_values=stack_pixels([e.image for e in examples], [e.uid for e in examples])
        if any(e.image is not None for e in examples) else None,  # text-only batches never touch images
    )


def packed_positions(examples: list[Example], width: int) -> torch.Tensor:
    """``[B, width]`` positions restarting at 0 at every document (a row without ``doc_lens``: one document)
    and at the padding tail."""
    pos = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        at = 0
        for n in (ex.doc_lens or [len(ex.input_ids)]) + [width - len(ex.input_ids)]:
            pos[i, at : at + n] = torch.arange(n)
            at += n
    return pos


# ---------------------------------------------------------------- which inputs a model gets
# Packed batches (``data.attention: within_documents``): eager and SDPA attention read the documents from the
# block-diagonal 4D mask of :meth:`Batch.model_inputs`; flash-attention cannot take that mask and runs the
# documents as variable-length sequences instead (``flash_attn_varlen_func``): positions without a mask, plus the
# cumulative document lengths over the flattened ``[B * T]`` tokens and the longest document, which Hugging Face
# derives from the positions only for a batch of one row. The student's forward, the online teacher, the held-out
# metrics and the packing probe all call :func:`model_inputs_for`, so they agree.

FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
"""``config._attn_implementation`` values whose packed batches run as varlen sequences."""


def uses_varlen(model: torch.nn.Module) -> bool:
    """True when ``model`` (plain, peft-, DDP- or compile-wrapped) runs flash-attention.

    Only DDP/DataParallel hide ``config`` (peft and compiled modules forward attribute reads to the model they
    wrap), so unwrapping ``.module`` is enough; this module stays below the models package, on the step's path."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in FLASH_ATTENTION


def model_inputs_for(model: torch.nn.Module, batch: Batch,
                     device: torch.device | str | None = None) -> dict[str, torch.Tensor | int]:
    """The keyword arguments of ``model``'s forward pass on ``batch``, on ``device`` (``None``: where they are).

    Unpacked batches, and any batch for a model without flash-attention: :meth:`Batch.model_inputs` (ids,
    padding or 4D document mask, positions, pixels). Packed batches for a flash-attention model:
    ``model_inputs(varlen=True)`` (ids and ``position_ids`` ``[B, T]``, no mask) plus ``cu_seq_lens_q/k``
    (``[n_docs + 1]`` int32 offsets into the flattened ``B * T`` tokens; every row starts a document, and a
    row's padding is a document of its own, never counted) and ``max_length_q/k`` (ints).
    """
    varlen = uses_varlen(model) and batch.position_ids is not None
    inputs = batch.model_inputs(varlen=True) if varlen else batch.model_inputs()
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    if varlen:
        positions = inputs["position_ids"].reshape(-1)
        starts = (positions == 0).nonzero().squeeze(1)
        cu = torch.cat([starts, starts.new_tensor([positions.numel()])]).to(torch.int32)
        longest = int(cu.diff().max())
        inputs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    return inputs


def prompt_length(target: list[bool], n_tokens: int, text_prompt_tokens: int) -> int:
    """How many leading tokens of a sequence form its prompt: those before its first learned token.

    ``target``: the sequence's per-token target flags (``Example.target``; flag 0 never counts,
    as in :func:`collate`). Plain text learns every token from position 1 on, so it has no
    prompt: its first ``text_prompt_tokens`` tokens are used, at most all but one. A sequence
    with no learned token is an error (the data pipeline drops such sequences).
    """
    first = next((i for i in range(1, n_tokens) if target[i]), None)
    if first is None:
        raise ValueError("a sequence without a learned token has no prompt to continue")
    return first if first > 1 else max(1, min(text_prompt_tokens, n_tokens - 1))


def batch_prompts(batch: Batch, text_prompt_tokens: int) -> list[list[int]]:
    """Per row of ``batch``: its prompt ids (:func:`prompt_length`; ``target_ids[b, t]`` is the token at
    ``t + 1``, so the row's target flags are its loss mask shifted right by one)."""
    prompts = []
    for b, n in enumerate(batch.attention_mask.sum(dim=1).tolist()):
        flags = [False] + batch.loss_mask[b, : n - 1].tolist()
        try:
            cut = prompt_length(flags, n, text_prompt_tokens)
        except ValueError:
            raise ValueError(f"sequence {batch.uids[b]} has no target token, so it has no prompt to continue") from None
        prompts.append(batch.input_ids[b, :cut].tolist())
    return prompts


class ExampleSampler:
    """Yields this rank's micro-batch of indices into a list of ``n`` examples (groups kept whole).

    The examples are laid out in groups of ``group_size`` consecutive sequences that
    must be drawn together (one record's predict and explain sequences, a chosen and
    a rejected trace); ``group_size = 1`` is plain per-sequence sampling. The sampler
    draws *groups* and hands out all of a group's indices in order.

    Epoch ``e`` visits a permutation of the ``n / group_size`` groups drawn from a
    ``torch.Generator`` seeded with ``seed + e`` (identity order when
    ``shuffle=False``). Each *global* micro-batch takes the next
    ``batch_size / group_size * world_size`` groups of the epoch; rank ``r`` gets its
    contiguous slice. So one process with batch ``2B`` sees exactly the examples that
    two processes with batch ``B`` see together.

    A global micro-batch never straddles epochs: when too few groups remain, the
    epoch's remainder is skipped and the next epoch starts (every rank then gets a
    full batch of distinct examples). The sampler cycles forever. ``state_dict()``
    holds the epoch and the position in it, enough for an exact resume.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
        group_size: int = 1,
    ) -> None:
        if batch_size < 1 or world_size < 1 or group_size < 1:
            raise ValueError(f"ExampleSampler: batch_size ({batch_size}), world_size ({world_size}) and group_size "
                             f"({group_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"ExampleSampler: rank {rank} is outside 0..{world_size - 1}")
        if batch_size % group_size:
            raise ValueError(f"train.micro_batch_size={batch_size} counts sequences and must be a multiple of "
                             f"{group_size} (each record gives {group_size} sequences, drawn together)")
        if n % group_size:
            raise ValueError(f"ExampleSampler: {n} examples are not whole groups of {group_size}")
        if n < batch_size * world_size:
            raise ValueError(
                f"ExampleSampler: {n} examples cannot fill one global micro-batch of "
                f"{batch_size} x {world_size} processes; lower train.micro_batch_size or add data"
            )
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.group_size = group_size
        self.epoch = 0
        self.position = 0  # groups of the current epoch already handed out (globally)
        self._order: list[int] | None = None

    @property
    def groups(self) -> int:
        return self.n // self.group_size

    @property
    def global_batch(self) -> int:
        """Groups per global micro-batch (all processes)."""
        return self.batch_size // self.group_size * self.world_size

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                self._order = torch.randperm(self.groups, generator=g).tolist()
            else:
                self._order = list(range(self.groups))
        return self._order

    def next_indices(self) -> list[int]:
        """This rank's next micro-batch (``batch_size`` indices, whole groups in order)."""
        if self.position + self.global_batch > self.groups:
            self.epoch += 1
            self.position = 0
            self._order = None
        order = self._epoch_order()
        per_rank = self.batch_size // self.group_size
        lo = self.position + self.rank * per_rank
        self.position += self.global_batch
        g = self.group_size
        return [g * group + j for group in order[lo : lo + per_rank] for j in range(g)]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "n": self.n,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch": self.global_batch,
            "group_size": self.group_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``; the data size, seed, shuffle and grouping must match (else a clear error)."""
        for key, mine in (("n", self.n), ("seed", self.seed), ("shuffle", self.shuffle),
                          ("group_size", self.group_size)):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"the sampler's checkpoint has {key}={state[key]!r} but this run has {mine!r}; "
                    "resuming would visit different examples"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = None
