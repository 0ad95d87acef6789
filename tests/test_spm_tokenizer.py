"""SentencePiece -> tokenizers conversion (InternLM2 / InternVL2): ids must equal sentencepiece's own, which is
the test-only oracle here. Small BPE models are trained in the test with InternLM2's settings."""
import io
import json
import random
import re

import pytest

import data
import load

import sentencepiece as spm  # test-only oracle (the test extra)

WORDS = ("the quick brown fox jumps over lazy dog hello world image click button screen menu file save open close "
         "点击 按钮 屏幕 你好 世界 保存 文件 def return print import self if else for in 1234 5678 2024 0.5 "
         "(x, y) [a] {b} <tag> foo_bar x=1; a->b 'quote' \"dq\" #hash @at").split()
SPECIAL = ["<|im_start|>", "<|im_end|>", "<img>"]


def corpus(n=3000, seed=0):
    rng = random.Random(seed)
    sep = ["", " ", "  ", "    ", "\t", " ."]
    return [rng.choice(sep[:2]) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) + rng.choice(sep)
            for _ in range(n)]


def train(path, **kw):
    # InternLM2's tokenizer.model settings: BPE, byte fallback, no normalization, no dummy prefix, spaces kept
    args = dict(vocab_size=600, model_type="bpe", byte_fallback=True, user_defined_symbols=SPECIAL,
                normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, minloglevel=2)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=buf, **(args | kw))
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    return {"internlm2": train(d / "internlm2.model"), "dummy_prefix": train(d / "dummy.model", add_dummy_prefix=True),
            "collapse": train(d / "collapse.model", remove_extra_whitespaces=True),
            "collapse_dummy": train(d / "collapse_dummy.model", remove_extra_whitespaces=True, add_dummy_prefix=True)}


def chunked(sp, s):
    # transformers' slow InternLM2Tokenizer: cut out the added tokens, sp.encode each stretch between them on its own
    return [i for part in re.split("(%s)" % "|".join(map(re.escape, SPECIAL)), s) if part
            for i in ([sp.piece_to_id(part)] if part in SPECIAL else sp.encode(part))]


def strings(n=300, seed=1):
    # spaces (single, runs, leading, trailing), tabs, newlines, digits, punctuation, CJK, emoji, characters the
    # training text never saw (byte fallback), and the user-defined symbols, glued with and without spaces.
    # Not here: literal control tokens ("<s>"): sentencepiece spells them out, HF (and we) read them as the token.
    atoms = WORDS + SPECIAL + [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", ".", ",", "!?", "...", "😀", "🎉👍", "é",
                               "Ω", "ß", "ﬁ", "Ａ", "€", "\u200b", "\u00a0", "zzqx", "ÿ", "ananas", "banana", "▁"]
    fixed = ["", " ", "  ", "\t", "\n", "a", " a", "a ", "  a  b  ", "hello world", "hello\tworld\n", "x" * 50,
             " " * 17, "<|im_start|>user\nhi<|im_end|>\n", "<img><img>", " <img> ", "😀", "点击按钮", "\U0001f9ea\u0301",
             " \t a", "a \t b", "\n \n", "a ▁ b", "a▁ ", " ▁ ", "▁", "▁a", "a\u3000\u3000b", "\u00a0 \u00a0",
             "x  <img>y",
             "<|im_start|>user\nHello  world<|im_end|>", "<|im_start|>  user \n  Hello   world  \n <|im_end|>\n"]
    rng = random.Random(seed)
    out = list(fixed)
    while len(out) < n:
        out.append("".join(rng.choice(atoms) + rng.choice(["", "", " ", "  "]) for _ in range(rng.randint(1, 12))))
    return out


def test_ids_match_sentencepiece(models):
    sp = spm.SentencePieceProcessor(model_file=models["internlm2"])
    tok = load.spm_to_tokenizer(models["internlm2"], add_bos=False)
    assert tok.get_vocab_size() == sp.get_piece_size()
    checked = 0
    for s in strings():
        ids = tok.encode(s).ids
        assert ids == sp.encode(s), (s, tok.encode(s).tokens, [sp.id_to_piece(i) for i in sp.encode(s)])
        if "▁" not in s:  # a literal ▁ is read as a space, by sentencepiece too
            assert tok.decode(ids, skip_special_tokens=False) == s == sp.decode(ids)
        checked += 1
    assert checked >= 300
    assert tok.encode("Ω").tokens == ["<0xCE>", "<0xA9>"]  # unseen character: byte fallback, not <unk>


@pytest.mark.parametrize("name", ["dummy_prefix", "collapse", "collapse_dummy"])
def test_normalizer_flags(models, name):
    # add_dummy_prefix / remove_extra_whitespaces: ids equal sentencepiece's for any text without added tokens, and
    # the slow tokenizer's (sp.encode per stretch between added tokens) for any text. Not whole-text sp.encode there:
    # that puts the dummy ▁ before a leading added token and strips/collapses spaces across added tokens.
    sp = spm.SentencePieceProcessor(model_file=models[name])
    tok = load.spm_to_tokenizer(models[name], add_bos=False)
    dummy = "dummy" in name
    assert tok.encode("hello").tokens[0].startswith("▁") == dummy
    n = 0
    for s in strings(seed=2) + strings(100, seed=3):
        ids, want = tok.encode(s).ids, chunked(sp, s)
        assert ids == want, (s, tok.encode(s).tokens, [sp.id_to_piece(i) for i in want])
        if not any(t in s for t in SPECIAL):
            assert ids == sp.encode(s)
            if "▁" not in s:
                assert tok.decode(ids) == (s if name == "dummy_prefix" else sp.decode(ids))
            n += 1
    assert n >= 200
    if name != "dummy_prefix":
        # only " " is whitespace to sentencepiece (identity normalization): tab, newline, NBSP, U+3000 stay as they are
        assert tok.encode("  a \t\t b  \n\n c\u00a0\u00a0d  ").tokens == \
            (["▁a"] if dummy else ["a"]) + ["▁", "\t", "\t", "▁b", "▁", "<0x0A>", "<0x0A>", "▁c"] + \
            ["<0xC2>", "<0xA0>"] * 2 + ["d"]
        chat = "<|im_start|>user\n  Hello   world  <|im_end|>\n<|im_start|>assistant\n"
        assert tok.encode(chat).ids == chunked(sp, chat) != sp.encode(chat)  # the difference documented in data.py
        # each stretch's dummy ▁ decodes as a space; only the text's first is dropped
        want = "user\n Hello world \n assistant\n" if dummy else "user\n Hello world\nassistant\n"
        assert tok.decode(tok.encode(chat).ids) == want


def test_load_tokenizer_folder(tmp_path):
    # an InternVL2-like folder: pieces [UNUSED_TOKEN_145/146] renamed by tokenizer_config.json, image tokens appended
    model = train(tmp_path / "tokenizer.model", user_defined_symbols=["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"])
    sp = spm.SentencePieceProcessor(model_file=model)
    end, start, n = sp.piece_to_id("[UNUSED_TOKEN_145]"), sp.piece_to_id("[UNUSED_TOKEN_146]"), sp.get_piece_size()
    decoder = {str(i): {"content": t, "special": True} for i, t in [(0, "<unk>"), (1, "<s>"), (2, "</s>"),
                                                                    (end, "<|im_end|>"), (start, "<|im_start|>")]}
    config = {"added_tokens_decoder": decoder, "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    appended = {"<img>": n, "</img>": n + 1, "<IMG_CONTEXT>": n + 2}
    (tmp_path / "added_tokens.json").write_text(json.dumps(appended))
    tok = load.load_tokenizer(str(tmp_path))
    assert tok.token_to_id("<|im_start|>") == start and tok.token_to_id("<|im_end|>") == end
    assert tok.token_to_id("[UNUSED_TOKEN_146]") is None
    assert all(tok.token_to_id(t) == i for t, i in appended.items())
    text = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nclick the  button<|im_end|>\n"
    ids = tok.encode(text).ids
    assert ids[0] == 1  # <s> leads
    assert ids.count(n + 2) == 2 and ids.count(n) == ids.count(n + 1) == 1  # appended tokens stay whole
    # everything else is tokenized exactly as sentencepiece tokenizes the original piece names
    plain = text.replace("<|im_start|>", "[UNUSED_TOKEN_146]").replace("<|im_end|>", "[UNUSED_TOKEN_145]")
    want = [1]
    for part in re.split("(<img>|</img>|<IMG_CONTEXT>)", plain):
        want += [appended[part]] if part in appended else sp.encode(part)
    assert ids == want
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tok.decode(ids, skip_special_tokens=True) == "user\n\nclick the  button\n"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert load.load_tokenizer(str(tmp_path)).encode("click").ids == sp.encode("click")


def test_rejects_non_bpe(tmp_path):
    with pytest.raises(ValueError, match="not BPE"):
        load.spm_to_tokenizer(train(tmp_path / "unigram.model", model_type="unigram", vocab_size=400))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load.load_tokenizer(str(tmp_path))
