"""
Writes a character-level tokenizer.json for the tiny Qwen fixtures (vocab_size 160):
    python tools/tiny_tokenizer.py tests/fixtures/qwen2_vl_tiny
Plain ASCII text round-trips, and the vision special tokens sit at the ids that
the fixtures' config.json fixes (image_token_id 151 etc.), so a demo can run end to end.
"""
import os
import sys

from tokenizers import AddedToken, Tokenizer, decoders, models

VOCAB_SIZE = 160
HEAD = ["<|endoftext|>", "<s>", "<|im_end|>", "<|im_start|>"]  # ids 0..3
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # ids 4..99
UNK = "<unk>"  # id 100
VISION = {151: "<|image_pad|>", 152: "<|video_pad|>", 153: "<|vision_start|>", 154: "<|vision_end|>"}


def build():
    tokens = HEAD + CHARS + [UNK]
    # fill the gaps with reserved tokens so ids are dense and the vision tokens land on their fixed ids
    tokens += [VISION.get(i, f"<|reserved_{i}|>") for i in range(len(tokens), VOCAB_SIZE)]
    vocab = {t: i for i, t in enumerate(tokens)}
    # BPE without merges and without a pre-tokenizer = one token per character
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()  # join pieces as they are; the default decoder would insert spaces
    # special tokens must never be split into characters; they keep their vocab ids
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in HEAD + list(VISION.values())])
    return tok


def check(tok):
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB_SIZE
    assert max(tok.get_vocab(with_added_tokens=True).values()) < VOCAB_SIZE
    for i, t in list(enumerate(HEAD)) + list(VISION.items()):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    text = "<|im_start|>user\nHello, world! 1+1=2 ~{}<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert max(ids) < VOCAB_SIZE and tok.decode(ids, skip_special_tokens=False) == text


if __name__ == "__main__":
    out_dir = sys.argv[1]
    tok = build()
    check(tok)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    check(Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json")))
    print(f"wrote {os.path.join(out_dir, 'tokenizer.json')}")
