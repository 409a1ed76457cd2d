"""Chat templates through transformers, on a tokenizer built offline."""

from __future__ import annotations

import pytest

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def tokenizer_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant",
             "system", "what", "is", "2", "+", "3", "?", "be", "brief", "\n", " "]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| "), behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(tmp_path)
    return str(tmp_path), {w: i for i, w in enumerate(words)}


def test_chat_template_and_stop_ids(tokenizer_dir):
    from megatron_paced.tokenizer import HFTokenizer

    path, ids = tokenizer_dir
    tok = HFTokenizer(path)
    got = [i for i in tok.encode_prompt("what is 2 + 3 ?") if i != ids[" "]]
    expected = [ids[w] for w in ["<|im_start|>", "user", "\n", "what", "is", "2", "+", "3", "?",
                                 "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]]
    assert got == expected
    assert tok.stop_token_ids == sorted({ids["<|endoftext|>"], ids["<|im_end|>"]})
    with_system = HFTokenizer(path, system_prompt="be brief").encode_prompt("what")
    assert with_system[:3] == [ids["<|im_start|>"], ids["system"], ids["\n"]]
    plain = HFTokenizer(path, chat_template=False).encode_prompt("what is 2")
    assert [i for i in plain if i != ids[" "]] == [ids["what"], ids["is"], ids["2"]]
    assert tok.decode([ids["what"], ids["<|im_end|>"]]).strip() == "what"


def test_missing_folder():
    from megatron_paced.tokenizer import HFTokenizer

    with pytest.raises(ValueError, match="--tokenizer '/nope'"):
        HFTokenizer("/nope")
