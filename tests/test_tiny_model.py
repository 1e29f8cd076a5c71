"""stages.tiny_model: a loadable random-weight Phi-3 with the chat tokens, byte-identical for a seed."""

from __future__ import annotations

import json

from contract import volume
from stages import tiny_model


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        tiny_model.build(tmp_path / name, tiny_model.data.DEFAULT_DATA, 512, seed, None)
    a, b, c = (volume.tree_hashes(tmp_path / n) for n in "abc")
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]


def test_the_model_has_the_phi3_architecture_and_chat_template(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_model.build(tmp_path, tiny_model.data.DEFAULT_DATA, 512, 0, None)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"] and "auto_map" not in config
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert len(tokenizer.tokenize("<|end|>")) == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]


def test_a_config_file_gives_real_shapes(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "hidden_size": 128,
                "intermediate_size": 256,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 4096,
                "auto_map": {"x": "remote.Code"},
            }
        )
    )
    tiny_model.build(tmp_path / "m", tiny_model.data.DEFAULT_DATA, 512, 0, config)
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert written["hidden_size"] == 128 and written["vocab_size"] == 4096 and "auto_map" not in written
