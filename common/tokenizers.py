"""In-memory tokenizers: no hub, no files, no sentencepiece.

transformers 5 backs every tokenizer class with the `tokenizers` library, so a tokenizer can be built from
an in-memory vocabulary (and merges). These builders give

  * make_clip_tokenizer()          the REAL OpenAI-CLIP BPE (49,408 tokens) from the BPE file that open_clip
                                   ships, located without importing open_clip (that would import torchvision);
                                   make_clip_tokenizer(num_merges=488) a tiny 1,002-token vocabulary
  * make_t5_tokenizer()            a character-level Unigram in T5 layout (<pad>=0, </s>=1, <unk>=2), for
                                   T5EncoderModel and UMT5EncoderModel miniatures
  * make_qwen2_tokenizer()         a byte-level BPE without merges, Qwen specials and a chat template
                                   (Flux2KleinPipeline calls apply_chat_template)
  * make_bert_tokenizer(words)     a WordPiece vocabulary for BLIP-style text encoders

All of them survive `save_pretrained` / `from_pretrained` (tokenizer.json + tokenizer_config.json).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import string
from typing import Sequence

CLIP_FULL_MERGES = 48894          # 256 bytes + 256 "</w>" bytes + 48,894 merges + 2 specials = 49,408 tokens
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte alphabet: each of the 256 bytes -> a printable unicode character.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256 + n) in byte order, so
    that a byte-level BPE never sees whitespace or control characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_bpe_path() -> str:
    """Path of open_clip's bundled bpe_simple_vocab_16e6.txt.gz, found through the import system only."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed; it ships the CLIP BPE file (pip install open_clip_torch)")
    return os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache(maxsize=1)
def _clip_merges() -> tuple[str, ...]:
    # line 0 of the file is a version header; the merges follow, one "a b" pair a line
    with gzip.open(clip_bpe_path()) as f:
        return tuple(f.read().decode("utf-8").split("\n")[1:CLIP_FULL_MERGES + 1])


def make_clip_tokenizer(num_merges: int = CLIP_FULL_MERGES, model_max_length: int = 77):
    """CLIPTokenizer with the first `num_merges` merges of the real CLIP BPE.

    Vocabulary = 256 byte chars + 256 "<char></w>" + one token per merge + <|startoftext|>, <|endoftext|>,
    so len = 514 + num_merges (49,408 for the full file, whose ids equal openai/clip-vit-* and open_clip's)."""
    from transformers import CLIPTokenizer

    if not 0 <= num_merges <= CLIP_FULL_MERGES:
        raise ValueError(f"num_merges must be in [0, {CLIP_FULL_MERGES}], got {num_merges}")
    merges = _clip_merges()[:num_merges]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    # merges must be tuples: a list of "a b" strings raises TypeError in transformers 5
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges],
                         model_max_length=model_max_length)


def make_t5_tokenizer(model_max_length: int = 512, extra_ids: int = 0):
    """Character-level Unigram T5Tokenizer (<pad>=0, </s>=1, <unk>=2, then "▁", "▁c" and "c" for ASCII
    printable c): 192 tokens. Word-initial characters get the higher score, so "cat" -> ▁c a t </s>."""
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids, model_max_length=model_max_length)


def make_qwen2_tokenizer(model_max_length: int = 512):
    """Byte-level Qwen2Tokenizer without merges (one token per byte) + <|endoftext|>, <|im_start|>,
    <|im_end|> and a ChatML chat template: 259 tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for s in QWEN_SPECIALS:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=list(QWEN_SPECIALS[1:]),
                         model_max_length=model_max_length)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def make_bert_tokenizer(words: Sequence[str] = ("a", "an", "the", "cat", "dog", "photo", "of", "red", "blue"),
                        model_max_length: int = 64):
    """Uncased WordPiece BertTokenizer over [PAD] [UNK] [CLS] [SEP] [MASK] + `words` + the lowercase ASCII
    letters and digits as "##" continuation pieces (so unknown words split into characters, not [UNK])."""
    from transformers import BertTokenizer

    vocab: list[str] = list(BERT_SPECIALS)
    for w in list(words) + list(string.ascii_lowercase + string.digits + string.punctuation):
        if w not in vocab:
            vocab.append(w)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True,
                         model_max_length=model_max_length)
