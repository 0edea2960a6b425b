"""The enumerated config values, each list declared once (no JAX here: the config checks import it
before any device is touched). The modules that act on a value -- the model's attention backends
and remat policies -- and ``trainer.config_checks`` both read these lists, so a value one of them
accepts is never refused by the other."""

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("xla", "cudnn", "flash", "splash")  # model.attention_impl, besides "auto"
ATTENTION_IMPLS = ("auto", *ATTENTION_BACKENDS)
REMAT = ("none", "full", "dots")                            # model.remat
