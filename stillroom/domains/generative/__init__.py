"""The generative domain: class-conditional denoisers (diffusion and flow models) and their one- and few-step
students (issue 15). Read in pipeline order: :mod:`.conventions` (time), :mod:`.data`, :mod:`.models`
(denoisers and folders), :mod:`.sampling`, :mod:`.engine` (score-distillation primitives), :mod:`.objectives`,
:mod:`.teacher`, :mod:`.evaluate`, :mod:`.prepare` (the domain)."""
