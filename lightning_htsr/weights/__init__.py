"""Stage 1: a model, a state dict or checkpoint files -> the weight matrices to analyze.

``matrix`` (what a weight matrix is, how a weight becomes one), ``modules`` (from an ``nn.Module``), ``state_dict``
(from named tensors, by name and shape), ``checkpoints`` (checkpoint files read one tensor at a time), ``adapters``
(``peft`` LoRA layers and adapter directories), ``ww_select`` (weightwatcher's layer selection and layer ids).
Nothing here imports the later stages.
"""
