"""Domain sections of the config tree: settings that only one kind of model has.

``DOMAINS`` is the one list of domain names (``RunConfig.domain``): each maps to its
section class, or ``None`` for a domain whose settings are the core sections alone
(``lm``: causal language models). :mod:`stillroom.domains` implements each.
"""

from __future__ import annotations

from typing import ClassVar

from stillroom.config.core import Strict


class DomainSection(Strict):
    """Settings of one domain; ``domain`` is the ``RunConfig.domain`` value that uses them."""

    domain: ClassVar[str]


DOMAINS: dict[str, type[DomainSection] | None] = {
    "lm": None,
}
