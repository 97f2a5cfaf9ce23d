"""Adapters trained beside a programmed chip: LoRA through peft (:mod:`.lora`), physics-aware training
(:mod:`.pat`) and zeroth-order optimisation (:mod:`.zeroth_order`)."""
