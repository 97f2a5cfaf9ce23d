"""Hardware-aware training (:mod:`.hwa`), its recipes (:mod:`.config`), the end-to-end pipeline
(:mod:`.pipeline`) and LoRA fine-tuning runs (:mod:`.finetune`)."""
