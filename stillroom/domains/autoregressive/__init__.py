"""The autoregressive domain: one-step generators of codebook token sequences distilled from an autoregressive
teacher (issue 15, spec 12). Read in pipeline order: :mod:`.toy` (codebook and exact joint), :mod:`.data`,
:mod:`.teacher` (the Llama teacher, trained here and cached), :mod:`.score` (its analytic conditional score),
:mod:`.nets` (generator and guidance networks), :mod:`.evaluate`, :mod:`.prepare` (the domain)."""
