"""The enumerated config values, each list declared once (no JAX here: the config checks import it
before any device is touched). The modules that act on a value -- the model's attention backends
and remat policies -- and ``trainer.settings.checks`` both read these lists, so a value one of them
accepts is never refused by the other."""

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("xla", "cudnn", "flash", "splash")  # model.attention_impl, besides "auto"
ATTENTION_IMPLS = ("auto", *ATTENTION_BACKENDS)
REMAT = ("none", "full", "dots", "dots_with_context")       # model.remat
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")   # lora.targets: the projections of a block
QUANT_KINDS = ("int8", "nf4")                               # lora.base_quant, besides ""
GATHER_WEIGHTS = ("auto", "once", "per_step")               # eval.gather_weights
METRICS = ("exact_match", "rouge1", "rouge2", "rougeL", "chrf")  # generation scores, as val/NAME


def parse_baselines(spec: str, default_k: int) -> list[int]:
    """``"zero_shot,few_shot:3"`` -> ``[0, 3]`` (numbers of exemplars); ``few_shot`` alone takes
    ``default_k`` (``eval.few_shot_k``)."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, k = item.partition(":")
        if name == "zero_shot" and not k:
            out.append(0)
        elif name == "few_shot" and (not k or k.isdigit()):
            out.append(int(k) if k else default_k)
        else:
            raise ValueError(f"--baselines: {item!r} is not zero_shot or few_shot[:K] "
                             "(e.g. zero_shot,few_shot:3)")
    return list(dict.fromkeys(out))
