"""Loading teachers and students, deriving a student from a teacher, vocabulary checks, LoRA.

Public API:

* :func:`load_model` (-> :class:`LoadedModel`), :func:`weight_hash`, :func:`rehome`
* :func:`ensure_builtin` (converted builtin models in the stillroom cache)
* :func:`derive_student`, :func:`angular_distances`, :func:`select_layers`, :func:`decoder_layers`
* :func:`tokenizer_hash`, :func:`check_vocab`, :func:`logit_width`
* :func:`apply_lora`, :func:`merge_lora`, :func:`unwrap`, :func:`output_head`, :func:`decoder_body`
"""

from stillroom.models.builtin import ensure_builtin
from stillroom.models.derive import angular_distances, decoder_layers, derive_student, select_layers, student_from_config
from stillroom.models.errors import LayerSelectionError, ModelLoadError, VocabularyMismatch
from stillroom.models.gguf import load_gguf, rehome
from stillroom.models.load import LoadedModel, load_model, model_source, weight_hash
from stillroom.models.lora import (
    apply_lora, body_of, decoder_body, merge_lora, output_head, unwrap, use_eager_attention,
)
from stillroom.models.vocab import check_vocab, logit_width, tokenizer_hash

__all__ = [
    "LayerSelectionError",
    "LoadedModel",
    "ModelLoadError",
    "VocabularyMismatch",
    "angular_distances",
    "apply_lora",
    "check_vocab",
    "body_of",
    "decoder_body",
    "decoder_layers",
    "derive_student",
    "student_from_config",
    "ensure_builtin",
    "load_gguf",
    "load_model",
    "logit_width",
    "model_source",
    "merge_lora",
    "output_head",
    "rehome",
    "select_layers",
    "tokenizer_hash",
    "unwrap",
    "use_eager_attention",
    "weight_hash",
]
