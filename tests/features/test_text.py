"""Text features: DSSM letter trigrams, hashed into buckets."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from twotower.features.specs import TextFeature
from twotower.features.text import TextTransform, trigram_codes
from twotower.features.transform import FitContext

_POINT = (1 << 21) - 1


def _decode(code: int) -> str:
    """The three code points packed into one trigram code, as a string."""
    return "".join(chr((int(code) >> shift) & _POINT) for shift in (42, 21, 0))


def _trigrams(texts: list[str | None]) -> list[list[str]]:
    codes, per_row = trigram_codes(pa.array(texts, pa.string()))
    decoded = [_decode(code) for code in codes]
    bounds = np.r_[0, np.cumsum(per_row)]
    return [decoded[bounds[i] : bounds[i + 1]] for i in range(len(texts))]


def _oracle(text: str | None) -> list[str]:
    """Letter trigrams by a plain loop: lower-case, split on non-alphanumerics, #word#."""
    out = []
    for word in re.findall(r"[^\W_]+", (text or "").lower()):
        marked = f"#{word}#"
        out += [marked[i : i + 3] for i in range(len(marked) - 2)]
    return out


def _text(**spec) -> TextTransform:
    transform = TextTransform(TextFeature("t", "t", **spec))
    transform.fit(pa.array(["ignored"]), FitContext())
    return transform


def test_good_gives_the_four_dssm_trigrams() -> None:
    assert _trigrams(["good"]) == [["#go", "goo", "ood", "od#"]]


def test_punctuation_splits_words_and_text_is_lower_cased() -> None:
    assert _trigrams(["Hi,THERE!x"]) == [["#hi", "hi#", "#th", "the", "her", "ere", "re#", "#x#"]]
    assert _trigrams(["R2-D2"]) == [["#r2", "r2#", "#d2", "d2#"]]  # digits are word letters


def test_unicode_letters_stay_in_words() -> None:
    assert _trigrams(["Café"]) == [["#ca", "caf", "afé", "fé#"]]
    assert _trigrams(["ÉTÉ"]) == [["#ét", "été", "té#"]]


def test_composed_and_decomposed_accents_give_the_same_trigrams() -> None:
    composed, decomposed = "Caf\u00e9", "Cafe\u0301"  # é as one code point, and e + accent
    assert (
        _trigrams([composed]) == _trigrams([decomposed]) == [["#ca", "caf", "af\u00e9", "f\u00e9#"]]
    )


def test_one_letter_word_gives_one_trigram() -> None:
    assert _trigrams(["a"]) == [["#a#"]]


def test_rows_are_kept_apart() -> None:
    assert _trigrams(["ab", None, "", "  ?! ", "c"]) == [["#ab", "ab#"], [], [], [], ["#c#"]]


@settings(deadline=None)
@given(st.lists(st.none() | st.text(alphabet="abcXYZ019 ,.!-_'\téÉüÜ"), max_size=6))
def test_trigram_codes_match_a_plain_loop(texts: list[str | None]) -> None:
    assert _trigrams(texts) == [_oracle(text) for text in texts]


def test_empty_and_null_text_give_an_all_padding_row() -> None:
    out = _text().transform(pa.array(["", None, "!!", "good"]))
    assert out.shape == (4, 4)
    assert not out[:3].any()
    assert (out[3] > 0).all()


def test_equal_trigrams_share_a_bucket() -> None:
    # #go goo ood od# #fo foo ood od#: positions 2 and 6, 3 and 7 are the same trigrams.
    out = _text().transform(pa.array(["Good food"]))[0]
    assert out[2] == out[6] and out[3] == out[7]
    assert len(set(out[:4].tolist())) == 4


def test_buckets_are_pinned() -> None:
    # Saved models depend on these exact buckets: changing the hash breaks them.
    assert _text().transform(pa.array(["good"])).tolist() == [[11216, 20792, 24592, 11683]]


def test_max_len_keeps_the_first_trigrams() -> None:
    full = _text().transform(pa.array(["good food", "a"]))
    short = _text(max_len=3).transform(pa.array(["good food", "a"]))
    np.testing.assert_array_equal(short, full[:, :3])


def test_no_rows() -> None:
    assert _text().transform(pa.array([], pa.string())).shape == (0, 1)


@settings(deadline=None)
@given(st.lists(st.none() | st.text(), min_size=1, max_size=6), st.integers(1, 40))
def test_any_text_gives_buckets_in_range_row_by_row(texts: list[str | None], buckets: int) -> None:
    transform = _text(buckets=buckets, max_len=8)
    out = transform.transform(pa.array(texts, pa.string()))
    assert out.dtype == np.int64
    assert out.shape[0] == len(texts) and 1 <= out.shape[1] <= 8
    assert out.min() >= 0 and out.max() <= buckets
    for text, row in zip(texts, out, strict=True):
        alone = transform.transform(pa.array([text], pa.string()))[0]
        count = int((alone > 0).sum())
        assert (alone[:count] > 0).all() and not alone[count:].any()  # padding at the end
        np.testing.assert_array_equal(row[:count], alone[:count])
        assert not row[count:].any()
