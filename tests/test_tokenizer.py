"""Chat templates through transformers, on a tokenizer built offline."""

from __future__ import annotations

import pytest

from tests.conftest import chat_tokenizer


@pytest.fixture
def tokenizer_dir(tmp_path):
    return chat_tokenizer(tmp_path)


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
