"""Training methods: what differs between them, each a small module behind the typed seam of
:mod:`stillroom.methods.base` (its record encoder, its steer split, its :class:`MethodPlan`).

``METHODS`` is the static registry, keyed by the names :data:`stillroom.config.methods.METHODS`
lists with their config sections (a test keeps the two in step).
"""

from stillroom.methods import conditional, ddk, ferkd, lelp, meal_v2, onpolicy, redi, step_by_step, unfused
from stillroom.methods import dmae, self_distill_fpt, tsm
from stillroom.methods import cfg_distill, dd2
from stillroom.methods import dmd, twinflow
from stillroom.methods import ogen
from stillroom.methods import llava_mod
from stillroom.methods import comd
from stillroom.methods import dho
from stillroom.methods import specvlm
from stillroom.methods import copg
from stillroom.methods import dparallel
from stillroom.methods import mend
from stillroom.methods import feature_kd
from stillroom.methods.base import Method, MethodContext, MethodPlan, StepCounts

KD = Method("kd", domains=None)
"""The loss terms against the teacher on the data as it is."""
SFT = Method("sft", ce_only=True, domains=None)
"""Cross-entropy on the data alone (the baseline's method); the teacher is not used in training."""

METHODS: dict[str, Method] = {m.name: m for m in (
    KD, SFT, onpolicy.METHOD, step_by_step.METHOD, redi.METHOD, ddk.METHOD, conditional.METHOD, meal_v2.METHOD,
    unfused.METHOD, lelp.METHOD, ferkd.METHOD, dmae.METHOD, self_distill_fpt.METHOD,
    tsm.METHOD, dmd.METHOD, twinflow.METHOD, dd2.METHOD,
    cfg_distill.METHOD,
    ogen.METHOD,
    llava_mod.METHOD,
    comd.METHOD,
    dho.METHOD,
    specvlm.METHOD,
    copg.METHOD,
    dparallel.METHOD,
    mend.METHOD,
    feature_kd.METHOD,
)}

__all__ = ["METHODS", "Method", "MethodContext", "MethodPlan", "StepCounts"]
