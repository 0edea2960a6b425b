"""The model: what a decoder computes, and nothing about how it is trained or stored.

``config`` (``ModelConfig``: the families' switches, no JAX), ``attention`` (one interface over the
XLA, cuDNN, Pallas-flash and splash backends, and the choice for the target devices),
``transformer`` (one Flax NNX decoder for every family: norms, RoPE, KV cache, scanned blocks,
remat), ``lora`` (adapters and the frozen/trainable split), ``quant`` (the int8/NF4 frozen base),
``flops`` (model FLOPs and device peaks). May import ``trainer.settings`` and the shared
``trainer.sharding``; never training, evaluation, IO or entry-point code.
"""
