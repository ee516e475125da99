"""workers.detokenizer: the pieces it emits add up to tokenizer.decode of the whole completion."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from workers.detokenizer import IncrementalDetokenizer, decoder_for

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "loom-tiny"

# Text with multi-byte characters (split across byte-level tokens), spaces,
# newlines and words the tokenizers never saw.
ALPHABET = list("abcdefghij klmnop qrstuvwxyz  ABCXYZ 0123456789 .,!?'\"-\n\t") + list("éöüßçñ—…€☕日本語中文🎉🙂ä́")


def _bundled():
    if not (BUNDLED / "tokenizer.json").is_file():
        pytest.skip("the bundled model is not in this checkout")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BUNDLED), local_files_only=True)


def _toy():
    from loom.toy_models import make_tokenizer

    return make_tokenizer()


def _sentencepiece_like():
    """A Llama-style tokenizer: Metaspace pre-tokenizer, byte fallback, a decoder that strips the first space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    rng = random.Random(0)
    corpus = ["".join(rng.choice(ALPHABET[:60]) for _ in range(200)) for _ in range(200)]
    tok.train_from_iterator(corpus, trainer)
    # Byte fallback needs the <0xNN> tokens in the model's own vocabulary.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    word = out("a world", add_special_tokens=False)["input_ids"][1:2]
    # What makes this tokenizer a test: a word token decoded alone loses its space.
    assert out.convert_ids_to_tokens(word)[0].startswith("▁") and not out.decode(word).startswith(" ")
    return out


TOKENIZERS = {"loom-tiny": _bundled, "toy": _toy, "sentencepiece-like": _sentencepiece_like}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _stream(tokenizer, tail: list[int], completion: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, tail)
    pieces = [detok.push(t) for t in completion]
    return pieces + [detok.flush()]


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def test_pieces_add_up_to_the_decoded_completion(tokenizer):
    rng = random.Random(13)
    specials = list(tokenizer.all_special_ids)
    for trial in range(300):
        prompt = tokenizer(_random_text(rng, rng.randint(1, 40)), add_special_tokens=False)["input_ids"]
        completion = tokenizer(_random_text(rng, rng.randint(0, 80)), add_special_tokens=False)["input_ids"]
        # Special tokens (skipped by decode) anywhere in the completion.
        for _ in range(rng.randint(0, 3)):
            completion.insert(rng.randint(0, len(completion)), rng.choice(specials))
        tail = prompt[-4:]
        whole = _decode(tokenizer, tail + completion)
        head = _decode(tokenizer, tail)
        assert whole.startswith(head)
        pieces = _stream(tokenizer, tail, completion)
        assert "".join(pieces) == whole[len(head):], (trial, tail, completion)
        if not tail:  # decode of the completion alone, literally
            assert "".join(pieces) == _decode(tokenizer, completion)


def test_random_token_ids_add_up_too(tokenizer):
    # Any ids at all, byte-level tokens in any order included: invalid UTF-8 in
    # the middle decodes to U+FFFD in the whole text, and must in the pieces
    # too. Not byte-fallback <0xNN> tokens: their decoder turns a whole run of
    # them into one U+FFFD per byte as soon as the run is invalid, which no
    # window short of the whole text can know (text from encoding is valid:
    # the test above covers them).
    rng = random.Random(7)
    ids = [i for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
           if not (t.startswith("<0x") and t.endswith(">"))]
    checked = 0
    for trial in range(300):
        tail = [rng.choice(ids) for _ in range(rng.randint(0, 4))]
        completion = [rng.choice(ids) for _ in range(rng.randint(1, 60))]
        whole, head = _decode(tokenizer, tail + completion), _decode(tokenizer, tail)
        if not whole.startswith(head) or head.endswith("\ufffd"):
            continue  # the tail's own text is not settled: no prompt ends that way
        checked += 1
        assert "".join(_stream(tokenizer, tail, completion)) == whole[len(head):], (trial, tail, completion)
    assert checked > 200


def test_a_character_split_across_tokens_is_emitted_once_whole():
    tokenizer = _toy()
    ids = tokenizer("🎉", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # the emoji's 4 bytes are several tokens
    pieces = _stream(tokenizer, tokenizer("ok", add_special_tokens=False)["input_ids"], ids)
    assert [p for p in pieces if p] == ["🎉"]


def test_the_fast_decoder_is_the_tokenizers_decode(tokenizer):
    decode = decoder_for(tokenizer)
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 12))]
        assert decode(ids) == _decode(tokenizer, ids)
