"""Domains: what a kind of model brings to the one core (:mod:`stillroom.domains.base`).

``DOMAINS`` is the static registry, keyed by ``RunConfig.domain``.
"""

from stillroom.domains.base import Domain, PreparedRun
from stillroom.domains.lm.prepare import LmDomain
from stillroom.domains.vision import ClassifierDomain
from stillroom.domains.autoregressive.prepare import AutoregressiveDomain
from stillroom.domains.generative.prepare import GenerativeDomain
from stillroom.domains.vision.mae_domain import MaeDomain
from stillroom.domains.vl.clip_domain import ClipDomain
from stillroom.domains.masked_diffusion.prepare import MaskedDiffusionDomain
from stillroom.domains.text_encoder.prepare import MlmDomain

DOMAINS: dict[str, Domain] = {d.name: d for d in (LmDomain(), ClassifierDomain(), MaeDomain(), GenerativeDomain(),
                                                        AutoregressiveDomain(), ClipDomain(),
                                                        MaskedDiffusionDomain(), MlmDomain())}

__all__ = ["DOMAINS", "Domain", "PreparedRun"]
