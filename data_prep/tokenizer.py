"""One text tokenizer interface over HF ``tokenizers`` files and SentencePiece models.

Transfusion needs five special tokens at known ids (padding, document bounds, image
bounds). ``Tokenizer.load`` finds them in the file or appends them after its vocabulary, so
any user tokenizer works unchanged. A Hugging Face model directory (or a tokenizer.json
with a ``tokenizer_config.json`` beside it) keeps the model's own padding and document
tokens (e.g. Llama 3's ``<|begin_of_text|>``), which its embeddings were trained on.
``encode`` never produces a special id from text: the packer inserts specials by id, so a
document cannot forge an image boundary.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import sentencepiece
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from megatron_transfusion.batch import SpecialTokens

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>")
HF_FILES = ("tokenizer.json", "tokenizer.model")  # in a Hugging Face model directory
HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # names the pad/bos/eos tokens there
ROLES = ("pad", "bos", "eos")  # the specials a tokenizer may declare itself


def declared_roles(tokenizer_file: Path) -> dict[str, str]:
    """The pad/bos/eos token strings the ``tokenizer_config.json`` beside a tokenizer names."""
    path = tokenizer_file.with_name(HF_TOKENIZER_CONFIG)
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    roles = {}
    for role in ROLES:
        token = config.get(f"{role}_token") if isinstance(config, dict) else None
        if isinstance(token, dict):  # an AddedToken serialised
            token = token.get("content")
        if isinstance(token, str):
            roles[role] = token
    return roles


class Tokenizer:
    """A loaded tokenizer file plus the ids of the five specials; build with ``load``."""

    def __init__(self, kind: str, path: Path, backend, special: SpecialTokens, vocab_size: int):
        self.kind = kind
        self.path = path
        self._backend = backend
        self.special = special
        self.vocab_size = vocab_size
        self._special_ids = frozenset(asdict(special).values())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load an HF ``tokenizer.json``, a SentencePiece ``*.model``, or the tokenizer of a
        Hugging Face model directory."""
        path = Path(path).resolve()
        if path.is_dir():
            found = [path / name for name in HF_FILES if (path / name).is_file()]
            if not found:
                raise FileNotFoundError(
                    f"directory {path} has no {' or '.join(HF_FILES)}: pass a tokenizer file"
                )
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} does not exist: pass an HF tokenizer.json or a "
                "SentencePiece .model, or train one with data_prep.tokenizer.train_bpe"
            )
        if path.suffix == ".json":
            return cls._load_hf(path)
        if path.suffix == ".model":
            return cls._load_sentencepiece(path)
        raise ValueError(
            f"unknown tokenizer format for {path}: expected an HF tokenizer.json (*.json) "
            "or a SentencePiece model (*.model)"
        )

    @classmethod
    def _load_hf(cls, path: Path) -> Tokenizer:
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path} is not a valid HF tokenizer.json: {e}") from e
        tok.no_truncation()
        tok.no_padding()
        declared = {
            role: token
            for role, token in declared_roles(path).items()
            if tok.token_to_id(token) is not None
        }
        names = [declared.get(role, default) for role, default in zip(ROLES, SPECIAL_TOKENS)]
        names += SPECIAL_TOKENS[len(ROLES) :]
        # Existing tokens keep their ids; missing ones get the next free ids, in order.
        tok.add_special_tokens([AddedToken(t, special=True) for t in names])
        tok.encode_special_tokens = True  # special strings in text are split like plain text
        special = SpecialTokens(*(tok.token_to_id(t) for t in names))
        vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        return cls("hf", path, tok, special, vocab_size)

    @classmethod
    def _load_sentencepiece(cls, path: Path) -> Tokenizer:
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # SentencePiece raises RuntimeError/OSError on bad files
            raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from e
        # SentencePiece declares pad/bos/eos by role; the image bounds can only be control
        # pieces of the same name (user-defined pieces would be matched in text).
        declared = {"<pad>": sp.pad_id(), "<bos>": sp.bos_id(), "<eos>": sp.eos_id()}
        next_id = sp.get_piece_size()
        ids = []
        for token in SPECIAL_TOKENS:
            i = declared.get(token, -1)
            if i < 0 and sp.is_control(sp.piece_to_id(token)):  # absent -> unk, not control
                i = sp.piece_to_id(token)
            if i < 0:
                i, next_id = next_id, next_id + 1
            ids.append(i)
        return cls("sentencepiece", path, sp, SpecialTokens(*ids), next_id)

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``; never adds specials and never maps text to a special id."""
        if self.kind == "hf":
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids``, skipping special ids."""
        ids = [int(i) for i in ids if int(i) not in self._special_ids]
        if self.kind == "hf":
            return self._backend.decode(ids, skip_special_tokens=True)
        return self._backend.decode(ids)

    def fingerprint(self) -> dict:
        """What a data shard records, so training can refuse shards from another tokenizer."""
        return {
            "kind": self.kind,
            "path": str(self.path),
            "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
            "vocab_size": self.vocab_size,
            "special": asdict(self.special),
        }

    def save_hf(self, directory: Path) -> None:
        """Write this tokenizer, its specials included, as a Hugging Face model directory's
        (``transformers.AutoTokenizer`` loads it; ``load`` reads the same ids back)."""
        if self.kind == "sentencepiece":
            shutil.copyfile(self.path, directory / "tokenizer.model")
            return
        self._backend.save(str(directory / "tokenizer.json"))
        names = {role: self._backend.id_to_token(getattr(self.special, role)) for role in ROLES}
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config |= {f"{role}_token": name for role, name in names.items()}
        (directory / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=1))

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, {self.path}, vocab_size={self.vocab_size})"


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with the specials at ids 0..4 and save it.

    Byte-level means every string round-trips; training is deterministic, so the same
    texts give a byte-identical tokenizer.json.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} specials"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return Tokenizer.load(path)
