"""
Writes a character-level tokenizer.json for a tiny fixture folder:
    python tools/tiny_tokenizer.py tests/fixtures/qwen2_vl_tiny      # Qwen layout, vocab 160
    python tools/tiny_tokenizer.py tests/fixtures/internvl2_tiny     # InternVL layout, vocab 100 (BOS for InternLM2)
Plain ASCII text round-trips, and the special tokens sit at the stand-in ids the fixtures use (Qwen: image_token_id
151 ...; InternVL: <img>=95, </img>=96, <IMG_CONTEXT>=97, <EXTRA_IMG_CONTEXT>=98), so a demo runs end to end.
"""
import argparse
import json
import os

from tokenizers import AddedToken, Tokenizer, decoders, models, processors

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


# InternVL stand-ins: vocab 100; characters other than these map to <unk> (the Chinese default system messages do)
IVL_HEAD = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4
IVL_CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + \
    [str(d) for d in range(10)] + list(" \n.,?!:;'\"-()[]/<>=_")  # ids 5..
IVL_SPECIAL = {95: "<img>", 96: "</img>", 97: "<IMG_CONTEXT>", 98: "<EXTRA_IMG_CONTEXT>"}


def build_internvl(bos, extra):
    special = {i: t for i, t in IVL_SPECIAL.items() if extra or t != "<EXTRA_IMG_CONTEXT>"}  # as InternVL2-8B: none
    tokens = IVL_HEAD + IVL_CHARS
    tokens += [special.get(i, f"<|reserved_{i}|>") for i in range(len(tokens), 100)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IVL_HEAD + list(special.values())])
    if bos:  # InternLM2's tokenizer prepends <s>
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size(with_added_tokens=True) == 100
    for i, t in list(enumerate(IVL_HEAD)) + list(special.items()):
        assert tok.token_to_id(t) == i, (t, i)
    return tok


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Writes the character-level tokenizer.json of a tiny fixture folder.")
    p.add_argument("folder", help="a fixture folder holding config.json")
    out_dir = p.parse_args().folder
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    if "llm_config" in config:
        tok = build_internvl(bos=config["llm_config"]["architectures"][0] == "InternLM2ForCausalLM",
                             extra=config["architectures"][0] == "MPGUI")
    else:
        tok = build()
        check(tok)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    print(f"wrote {os.path.join(out_dir, 'tokenizer.json')}")
