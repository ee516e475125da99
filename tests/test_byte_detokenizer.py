"""workers.byte_detokenizer: for byte-level tokenizers, pieces that add up to tokenizer.decode, as the window detokenizer's do."""
from __future__ import annotations

import random

import pytest

import workers.byte_detokenizer as bd
from tests.test_detokenizer import _bundled, _decode, _random_text, _sentencepiece_like, _toy
from workers.detokenizer import ByteDetokenizer, IncrementalDetokenizer, new_detokenizer

BYTE_LEVEL = {"loom-tiny": _bundled, "toy": _toy}


@pytest.fixture(scope="module", params=list(BYTE_LEVEL))
def tokenizer(request):
    return BYTE_LEVEL[request.param]()


@pytest.fixture(scope="module")
def table(tokenizer):
    table = bd.byte_table(tokenizer)
    assert table is not None, "a byte-level tokenizer gets a table"
    return table


def _stream(table: list[bytes], completion: list[int]) -> list[str]:
    detok = ByteDetokenizer(table)
    return [detok.push(t) for t in completion] + [detok.flush()]


def test_pieces_add_up_to_the_decoded_completion(tokenizer, table):
    rng = random.Random(13)
    specials = list(tokenizer.all_special_ids)
    for trial in range(300):
        completion = tokenizer(_random_text(rng, rng.randint(0, 80)), add_special_tokens=False)["input_ids"]
        for _ in range(rng.randint(0, 3)):
            completion.insert(rng.randint(0, len(completion)), rng.choice(specials))
        assert "".join(_stream(table, completion)) == _decode(tokenizer, completion), (trial, completion)


def test_random_token_ids_add_up_too(tokenizer, table):
    # Byte tokens in any order: invalid UTF-8 in the middle is U+FFFD in both;
    # one cut short at the end is U+FFFD from flush, as in the whole decode.
    rng = random.Random(7)
    for trial in range(500):
        completion = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 60))]
        assert "".join(_stream(table, completion)) == _decode(tokenizer, completion), (trial, completion)


def test_each_piece_is_sent_as_soon_as_its_text_is_whole(tokenizer, table):
    # For text, what was sent after k tokens is the decode of those k tokens,
    # less a character whose last bytes have not come yet: nothing waits longer.
    rng = random.Random(5)
    for _ in range(100):
        completion = tokenizer(_random_text(rng, 60), add_special_tokens=False)["input_ids"]
        pieces = _stream(table, completion)
        for k in range(1, len(completion) + 1):
            assert "".join(pieces[:k]) == _decode(tokenizer, completion[:k]).rstrip("\ufffd"), (completion, k)


def test_a_character_is_held_until_its_last_byte(table):
    tokenizer = _toy()
    ids = tokenizer("🎉", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    pieces = _stream(bd.byte_table(tokenizer), ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == "🎉" and pieces[-1] == ""


def test_an_id_past_the_vocabulary_adds_nothing(table):
    detok = ByteDetokenizer(table)
    assert detok.push(len(table) + 5) == ""


def test_other_tokenizers_keep_the_window_detokenizer():
    sp = _sentencepiece_like()
    assert bd.byte_table(sp) is None
    assert isinstance(new_detokenizer(sp, None, [1, 2]), IncrementalDetokenizer)


def test_a_table_that_disagrees_with_the_tokenizer_is_not_used(monkeypatch):
    tokenizer = _toy()
    real = bd._token_bytes
    # One wrong token: the check against the tokenizer's own decode must catch it.
    monkeypatch.setattr(bd, "_token_bytes", lambda token: b"?" if token == "e" else real(token))
    assert bd.byte_table(tokenizer) is None


def test_bytes_that_are_no_character_wait_for_text_that_is():
    table = bd.byte_table(_toy())
    stray, letter = table.index(b"\x80"), table.index(b"a")
    assert _stream(table, [stray, stray, letter]) == ["", "", "\ufffd\ufffda", ""]
    assert _stream(table, [letter, stray]) == ["a", "", "\ufffd"]  # flush gives what is held
