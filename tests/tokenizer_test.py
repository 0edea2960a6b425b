"""Loading a tokenizer directory (``data_pipeline.tokenizer.load_tokenizer``)."""

import subprocess
import sys

from tests.cli_test import ROOT
from tests.templating_test import TEMPLATE_WITH_BOS, word_tokenizer


def test_a_saved_runs_tokenizer_loads_as_autotokenizer_would_without_importing_torch(tmp_path):
    """A run saves its tokenizer with the generic class; loading it back skips AutoTokenizer's model
    registry, which imports PyTorch where it is installed (seconds at every start), and gives the
    same tokenizer AutoTokenizer gives."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from data_pipeline.tokenizer import load_tokenizer  # noqa: PLC0415
    word_tokenizer(TEMPLATE_WITH_BOS).save_pretrained(tmp_path)
    ours, auto = load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert type(ours) is type(auto)
    assert ours.special_tokens_map == auto.special_tokens_map and ours.chat_template == auto.chat_template
    chat = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"}]
    assert ours.apply_chat_template(chat) == auto.apply_chat_template(chat)
    assert ours("the cat a dog").input_ids == auto("the cat a dog").input_ids
    code = (f"import sys; from data_pipeline.tokenizer import load_tokenizer; load_tokenizer({str(tmp_path)!r}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", "loading the run's tokenizer imported torch"
