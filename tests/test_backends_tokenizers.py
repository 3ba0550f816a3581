"""In-memory tokenizers (common/tokenizers.py) against independent references."""
import pytest

from common import tokenizers as T

SQUIRREL = "A painting of a squirrel eating a burger"


def test_clip_full_ids_equal_open_clip():
    open_clip = pytest.importorskip("open_clip")
    tok = T.make_clip_tokenizer()
    assert len(tok) == 49408
    ref = open_clip.get_tokenizer("ViT-H-14")
    for text in [SQUIRREL, "a cat, on   a MAT!", "café à la crème 東京", "neon-lit cyberpunk street, 8k"]:
        ids = tok(text)["input_ids"]
        r = ref([text])[0].tolist()
        assert ids == r[:len(ids)] and all(v == 0 for v in r[len(ids):])
    # the published ids of the diffusers/CLIP docs example
    assert tok(SQUIRREL)["input_ids"] == [49406, 320, 3086, 539, 320, 14004, 4371, 320, 6548, 49407]


def test_clip_tiny_vocab_and_roundtrip(tmp_path):
    from transformers import CLIPTokenizer
    tok = T.make_clip_tokenizer(num_merges=488)
    assert len(tok) == 514 + 488
    ids = tok(SQUIRREL, padding="max_length", max_length=77)["input_ids"]
    assert len(ids) == 77 and max(ids) < len(tok)
    tok.save_pretrained(tmp_path)
    assert CLIPTokenizer.from_pretrained(tmp_path)(SQUIRREL)["input_ids"] == tok(SQUIRREL)["input_ids"]
    with pytest.raises(ValueError):
        T.make_clip_tokenizer(num_merges=-1)


def test_t5_layout_and_decode():
    tok = T.make_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a red cube")["input_ids"]
    assert ids[-1] == 1 and 2 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a red cube"


def test_qwen2_bytes_and_chat_template():
    tok = T.make_qwen2_tokenizer()
    assert len(tok) == 259
    text = "héllo"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))          # no merges: one token per byte
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids("<|im_start|>") == 257


def test_bert_wordpiece():
    tok = T.make_bert_tokenizer(words=["a", "cat"])
    ids = tok("A cat")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "cat", "[SEP]"]
    toks = tok.convert_ids_to_tokens(tok("zebra")["input_ids"])
    assert "[UNK]" not in toks and "".join(t.removeprefix("##") for t in toks[1:-1]) == "zebra"
