"""Text encoders (BERT) trained with a masked-language-model objective: the ``mlm`` domain (:mod:`.prepare`), its
texts (:mod:`.data`), masking and loss (:mod:`.mlm`), models (:mod:`.models`), teacher (:mod:`.teacher`) and
measurements: linear probe and few-label fine-tuning (:mod:`.probe`)."""
