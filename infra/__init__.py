"""Infrastructure the stage scripts share: command lines and flag blocks, checkpoints and resume, torchrun
(DDP/FSDP2), LoRA, model and data loading, the embedded world, precision, memory probes, held-out evaluation
and printed text. None of it is the algorithm: a reader of dvpo.py can skip this folder."""
