"""adapt: training and adaptation of adapters to compressed variants.

Modules (import them directly; this package imports nothing heavy):
- ``batches``: datasets → seeded, random-access training batches
- ``loop``: the one training loop (``TrainConfig``, ``train``), checkpoints and exact resume
- ``train``: plain LoRA / QLoRA training (``train_lora``)
- ``recovery``: CA-LoRA recovery modules beside linear layers, their file
- ``convert``: CA-LoRA / CPET conversion (``build_student``, ``build_teacher``,
  ``distill_convert``, ``load_adapted``)
- ``peft_io``: PEFT glue shared by the above
- ``prompt``, ``prompt_transfer``: compression-aware soft prompts
"""
