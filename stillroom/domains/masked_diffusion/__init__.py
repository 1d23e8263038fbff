"""The ``masked_diffusion`` domain: a small masked-diffusion LM, its samplers and dParallel's evaluation."""
