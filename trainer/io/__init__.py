"""Everything read from or written to storage: ``paths`` (local and ``gs://``, through
``etils.epath``), ``hf`` (Hugging Face configs and safetensors to our parameters and back), ``gguf``
(GGUF files), ``checkpoint`` (the run's Orbax checkpoints and which step is best).
May import ``trainer.models``; never training, evaluation or entry-point code.
"""
