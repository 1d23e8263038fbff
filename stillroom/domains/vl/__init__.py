"""Vision-language models built here and the domains that train them: a small CLIP (image and text towers
trained contrastively) and a small LLaVA-style VLM (image encoder, projector, decoder LM), with the procedural
scenes, captions and visual questions they learn from."""
