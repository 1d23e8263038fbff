"""Which teacher sources a VLM run accepts (check_vlm_run): every source that reads the images (online, store,
remote, ensembles of them); refused by name: another tokenizer with a remote or ensemble teacher, and an ensemble
member that is a text model by its reference."""

from __future__ import annotations

import pytest

from stillroom.config.schema import RunConfig

BASE = {"vlm": {}, "student": {"from_config": {"text_config": {"num_hidden_layers": 1}}}}
REMOTE = {"source": "remote", "remote": {"url": "http://127.0.0.1:1/v1", "model": "m"}}


def test_sources_that_read_the_images_are_accepted():
    for teacher in ({"source": "online"}, {"source": "store"}, REMOTE,
                    {"source": "ensemble", "ensemble": [{"source": "online"}, {"source": "online"}]},
                    {"source": "ensemble", "ensemble_mode": "route",
                     "ensemble": [{"source": "online", "model": {"path": "./another-llava"}}, REMOTE,
                                  {"source": "store", "store": {"path": "./store"}}]}):
        assert RunConfig(**BASE, teacher=teacher).teacher.source == teacher["source"]


def test_another_tokenizer_with_a_remote_or_ensemble_teacher_is_refused():
    with pytest.raises(ValueError, match="teacher.tokenizer_mode=cross with teacher.source=remote in a VLM run"):
        RunConfig(**BASE, teacher={**REMOTE, "tokenizer_mode": "cross"})
    nested = {"source": "ensemble", "ensemble": [{**REMOTE, "tokenizer_mode": "cross"}]}
    with pytest.raises(ValueError, match="teacher.ensemble.0.tokenizer_mode=cross"):
        RunConfig(**BASE, teacher=nested)


def test_a_text_model_member_is_refused_by_its_reference():
    member = {"source": "online", "model": {"gguf": "text.gguf"}}
    with pytest.raises(ValueError, match="teacher.ensemble.1.model names a text model"):
        RunConfig(**BASE, teacher={"source": "ensemble", "ensemble": [{"source": "online"}, member]})
    # the default model, named or not (a resolved config names it), is the run's teacher: here the VLM teacher, as
    # the factory reads a member whose model equals teacher.model
    named = {"source": "online", "model": {"builtin": "smollm2-135m-instruct"}}
    RunConfig(**BASE, teacher={"source": "ensemble", "ensemble": [{"source": "online"}, named]})
    deep = {"source": "ensemble", "ensemble": [{"source": "ensemble", "ensemble": [member]}]}
    with pytest.raises(ValueError, match="teacher.ensemble.0.ensemble.0.model names a text model"):
        RunConfig(**BASE, teacher=deep)
