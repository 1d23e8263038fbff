"""stillroom: knowledge distillation for language models.

The package reads in pipeline order: ``config`` -> ``data`` -> ``models`` ->
``teachers`` -> ``losses`` -> ``methods`` -> ``train`` -> ``eval``.
"""

__version__ = "0.1.0"
