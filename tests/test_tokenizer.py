"""Tokenizer: deterministic BPE training, specials at known ids that text can never
produce, user HF/SentencePiece files loading unchanged, and clear errors."""

import json
from pydoc_data.topics import topics

import pytest
import sentencepiece
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from data_prep.tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe
from megatron_transfusion.batch import SpecialTokens

TEXTS = sorted(topics.values())[:25]
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\n\nand blank lines  ",
    "naïve café, 日本語のテキスト, emoji 😀🇫🇷 and combining e\u0301",
    "",
]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(TEXTS, 600, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def test_train_bpe_is_deterministic_with_specials_first(tmp_path, bpe):
    again = train_bpe(TEXTS, 600, tmp_path / "again.json")
    assert again.path.read_bytes() == bpe.path.read_bytes()
    assert bpe.special == SpecialTokens(pad=0, bos=1, eos=2, boi=3, eoi=4)
    assert bpe.vocab_size == 600
    assert min(bpe.encode(TEXTS[0])) >= len(SPECIAL_TOKENS)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_special_strings_in_text_are_plain_text(bpe):
    text = "an image <boi> here <eoi>, then <pad><bos><eos>"
    ids = bpe.encode(text)
    assert not set(ids) & {0, 1, 2, 3, 4}
    assert bpe.decode(ids) == text


def test_decode_skips_special_ids(bpe):
    s = bpe.special
    ids = [s.bos, *bpe.encode("a caption"), s.boi, s.pad, s.eoi, s.eos]
    assert bpe.decode(ids) == "a caption"


def test_sentencepiece_specials_reused_or_appended(tmp_path):
    lines = [line for text in TEXTS for line in text.splitlines() if line.strip()][:400]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=300,
        control_symbols=["<boi>"],
        user_defined_symbols=["<eoi>"],
        normalization_rule_name="identity",
        minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tok = Tokenizer.load(tmp_path / "sp.model")
    n = sp.get_piece_size()
    # bos/eos by SentencePiece's own roles, <boi> is a control piece; <pad> (disabled in
    # the model) and <eoi> (a user-defined piece, matched in text) are appended in order.
    assert tok.special == SpecialTokens(
        pad=n, bos=sp.bos_id(), eos=sp.eos_id(), boi=sp.piece_to_id("<boi>"), eoi=n + 1
    )
    assert tok.vocab_size == n + 2
    ids = tok.encode("x <boi> y <eoi> z")
    assert not set(ids) & set(tok.fingerprint()["special"].values())
    assert sp.piece_to_id("<eoi>") in ids  # the user's piece, still plain text to us
    assert tok.decode([tok.special.bos, *tok.encode("an assert statement"), tok.special.eoi]) == (
        "an assert statement"
    )
    assert tok.fingerprint()["kind"] == "sentencepiece"


def test_hf_file_lacking_specials_gets_them_appended(tmp_path):
    user = HFTokenizer(models.BPE())
    user.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    user.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    user.train_from_iterator(TEXTS, trainer)
    user.save(str(tmp_path / "tokenizer.json"))
    n = user.get_vocab_size()

    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.special == SpecialTokens(pad=n, bos=n + 1, eos=1, boi=n + 2, eoi=n + 3)
    assert tok.vocab_size == n + 4
    text = "<|endoftext|> is text, so are <boi> and <eos>"
    ids = tok.encode(text)
    assert not set(ids) & {0, 1, n, n + 1, n + 2, n + 3}
    assert tok.decode(ids) == text
    assert tok.encode("plain words") == user.encode("plain words").ids  # file used unchanged


def test_fingerprint_follows_the_file(tmp_path, bpe):
    fp = bpe.fingerprint()
    assert fp == Tokenizer.load(bpe.path).fingerprint()
    assert fp["kind"] == "hf" and fp["path"] == str(bpe.path) and fp["vocab_size"] == 600
    assert fp["special"] == {"pad": 0, "bos": 1, "eos": 2, "boi": 3, "eoi": 4}
    path = tmp_path / "tokenizer.json"
    path.write_bytes(bpe.path.read_bytes())
    before = Tokenizer.load(path).fingerprint()["sha256"]
    train_bpe(TEXTS[:5], 600, path)
    assert Tokenizer.load(path).fingerprint()["sha256"] != before


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json.*train_bpe"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "vocab.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="vocab.txt.*tokenizer.json.*SentencePiece"):
        Tokenizer.load(tmp_path / "vocab.txt")
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match="bad.json is not a valid HF tokenizer"):
        Tokenizer.load(tmp_path / "bad.json")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.model is not a valid SentencePiece"):
        Tokenizer.load(tmp_path / "bad.model")
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(TEXTS, 100, tmp_path / "small.json")
