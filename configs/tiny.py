"""A tiny variant of the demo for tests: trains in seconds, same code paths."""

from configs import demo


def get_config():
    c = demo.get_config()
    c.data.synthetic.num_rows = 300
    c.data.max_length = 36  # one padded example per row: the tests' literal shapes assume it
    c.data.packing = "none"
    c.tokenizer.min_frequency = 8
    c.model.hidden_size = 32
    c.model.intermediate_size = 64
    c.model.num_hidden_layers = 2
    c.model.num_attention_heads = 4
    c.model.num_key_value_heads = 2
    c.model.head_dim = 8
    c.optimizer.warmup_steps = 1
    c.train.num_steps = 2
    c.train.batch_size = 8
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.eval_batch_size = 16
    c.train.checkpoint_every = 2
    c.train.progress_bar = False
    c.data.cache = False  # tests that test the cache point it at a temp dir
    c.eval.max_examples = 16
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 4
    c.eval.few_shot_k = 1
    c.eval.every_steps = 0  # tests that test the in-training generation eval turn it on
    return c
