"""Packing whole records into ``seq_len`` blocks, and the checks of ``data.attention: within_documents``.

With ``data.pack: true`` and ``data.attention: within_documents`` every packed document attends only to
itself: :class:`~stillroom.data.batch.Example.doc_lens` carries the document lengths of a block,
:func:`~stillroom.data.batch.collate` turns them into position ids that restart at each document, and
:meth:`~stillroom.data.batch.Batch.model_inputs` into a block-diagonal causal mask. Text documents are
concatenated and cut as with plain packing (:meth:`stillroom.data.sequences.SequenceBuilder.packed`);
chat and prompt/completion records are packed whole here (:func:`fit_blocks`), never split.

Before step 0 a run in this mode refuses what cannot honour the boundaries (:func:`refuse_within_documents`)
and checks on the loaded models that a packed pair of documents gives the logits of each document alone
(:func:`check_document_attention`), so a model that ignores the mask fails loudly instead of training on
cross-document attention.
"""

from __future__ import annotations

import bisect

import torch

from stillroom.data.batch import Example, collate, model_inputs_for


def fit_blocks(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into blocks of at most ``capacity`` tokens, best-fit decreasing.

    The longest item goes first, each into the fullest block it still fits in (ties: the earliest block),
    else into a new block; items of equal length keep their order. Deterministic, ``O(n log n)`` lookups.
    Every length must be ``<= capacity`` (records are truncated or dropped to ``seq_len`` before).
    """
    if any(n > capacity or n < 1 for n in lengths):
        raise ValueError(f"fit_blocks: lengths must lie in [1, {capacity}]")
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, block index)
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            blocks.append([i])
            room, b = capacity - lengths[i], len(blocks) - 1
        else:
            room, b = free.pop(at)
            blocks[b].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return blocks


def refuse_within_documents(cfg) -> None:
    """Raise ``ValueError`` naming the setting when ``cfg`` (a run config) combines
    ``data.attention: within_documents`` with what cannot keep packed documents apart."""
    if not (cfg.data.pack and cfg.data.attention == "within_documents"):
        return
    why = None
    if getattr(cfg, "vlm", None) is not None:
        why = "image records (vlm) are never packed: each sequence has its own image"
    elif cfg.teacher.tokenizer_mode == "cross":
        why = "a cross-tokenizer teacher re-tokenizes whole rows and would read across the documents"
    elif cfg.teacher.source == "remote" or any(m.source == "remote" for m in cfg.teacher.ensemble):
        why = "a remote teacher scores whole rows with plain causal attention"
    if why is not None:
        raise ValueError(f"data.attention=within_documents: {why}; set data.attention=across_documents "
                         "(or data.pack=false)")


def check_document_attention(model: torch.nn.Module, label: str) -> None:
    """Fail unless ``model`` (a causal LM) gives a packed pair of documents the logits of each alone.

    Two short random documents are run packed (``[1, 11]``: positions restarting, the block mask of
    :meth:`Batch.model_inputs`), alone, and concatenated plainly (attending across). The packed logits must
    sit at most a tenth as far from the lone ones as the plain concatenation's do: rounding (bf16 included)
    stays far below that, a model that ignores the mask or the positions does not. The packed inputs are the
    training step's (:func:`~stillroom.data.batch.model_inputs_for`): a flash-attention model is probed
    on its varlen inputs. ``label`` names the model
    in the error (``student``, ``teacher``). Runs in eval mode (no dropout) and restores the model's mode.
    """
    vocab = int(model.get_output_embeddings().weight.shape[0])
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 6)]
    packed = Example(docs[0] + docs[1], [False] * 11, uid="probe", doc_lens=[5, 6])
    training = model.training
    model.eval()
    with torch.no_grad():
        run = lambda **inputs: model(**inputs, use_cache=False).logits[0, 5:].float()  # noqa: E731 (doc 2)
        within = run(**model_inputs_for(model, collate([packed], 0), device))
        across = run(input_ids=torch.tensor([packed.input_ids], device=device))
        alone = model(input_ids=torch.tensor([docs[1]], device=device), use_cache=False).logits[0].float()
    model.train(training)
    gap, leak = (within - alone).abs().max().item(), (across - alone).abs().max().item()
    if not gap <= max(0.1 * leak, 1e-5 * alone.abs().max().item()):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", "?")
        raise ValueError(
            f"data.attention=within_documents: the {label} ({type(model).__name__}, attention {impl}) does not keep "
            f"packed documents apart (its logits differ from the document run alone by {gap:.3g}, attending across "
            f"documents by {leak:.3g}); it ignores the 4D attention mask or the position ids. Use "
            "data.attention=across_documents or data.pack=false for it"
        )
