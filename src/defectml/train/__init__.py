"""The learning stage: DFT results in, datasets out (:mod:`.dataset`), for fine-tuned models."""
