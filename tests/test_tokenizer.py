import json
import random

import pytest

from tokenizer import EOS_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer


def naive_encode(tokenizer, text):
    """Longest match by trying every vocabulary entry at every position."""
    ids, i = [], 0
    while i < len(text):
        best = max((t for t in tokenizer.itos if text.startswith(t, i)), key=len, default=None)
        if best is None:
            ids.append(UNK_ID)
            i += 1
        else:
            ids.append(tokenizer.stoi[best])
            i += len(best)
    return ids


def make(chars="中国人民大学生abc<|>", words=()):
    return Tokenizer(SPECIAL_TOKENS + list(dict.fromkeys(chars)) + list(words))


def test_longest_match_with_overlapping_words():
    tok = make(words=["中国", "中国人", "人民", "大学", "大学生", "学生"])
    ids = tok.encode("中国人民大学生")
    assert [tok.itos[i] for i in ids] == ["中国人", "民", "大学生"]
    ids = tok.encode("中国民")
    assert [tok.itos[i] for i in ids] == ["中国", "民"]


def test_prefix_of_a_word_that_is_not_a_word_falls_back_to_characters():
    tok = make(words=["中国人民"])  # "中国" and "中国人" are not entries
    assert [tok.itos[i] for i in tok.encode("中国人大")] == ["中", "国", "人", "大"]


def test_special_tokens_typed_inside_text():
    tok = make()
    ids = tok.encode("a<|eos|>b<|")
    assert ids[1] == EOS_ID
    assert [tok.itos[i] for i in ids] == ["a", "<|eos|>", "b", "<", "|"]
    assert tok.decode(ids) == "a<|eos|>b<|"


def test_unknown_characters_and_astral_plane():
    tok = make(chars="ab😀")
    ids = tok.encode("a😀x🚀b")
    assert ids[1] == tok.stoi["😀"]
    assert ids[2] == UNK_ID and ids[3] == UNK_ID
    assert tok.decode(ids) == "a😀<|unknown|><|unknown|>b"


def test_empty_text():
    assert make().encode("") == []
    assert make().decode([]) == ""


def test_round_trip_and_agreement_with_naive_reference():
    rng = random.Random(0)
    tok = make(chars="中国人民大学生abc<|>😀", words=["中国", "中国人", "学生", "ab", "abc", "bca"])
    alphabet = list("中国人民大学生abc<|>😀") + ["<|eos|>", "<|instruct_mark|>"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        ids = tok.encode(text)
        assert ids == naive_encode(tok, text)
        assert tok.decode(ids) == text


def test_build_is_deterministic_and_ordered_by_frequency():
    corpus = ["我们的我们的学习", "学习我们"]
    a = Tokenizer.build(corpus, mined_words=3)
    b = Tokenizer.build(list(corpus), mined_words=3)
    assert a.itos == b.itos
    assert a.itos[:len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    chars = a.itos[len(SPECIAL_TOKENS):len(SPECIAL_TOKENS) + 6]
    assert chars[:2] == ["们", "我"]  # 3 occurrences each, ties by code point
    assert "我们" in a.stoi  # the most frequent bigram becomes a word


def test_build_caps_size_and_honours_min_count():
    corpus = ["aaaabbbcc d"]
    tok = Tokenizer.build(corpus, vocab_size=len(SPECIAL_TOKENS) + 2)
    assert tok.itos[len(SPECIAL_TOKENS):] == ["a", "b"]
    tok = Tokenizer.build(corpus, min_count=2)
    assert set(tok.itos[len(SPECIAL_TOKENS):]) == {"a", "b", "c"}
    tok = Tokenizer.build(corpus, words=["cc d", "ab"])
    assert tok.encode("cc d") == [tok.stoi["cc d"]]
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.build([""])


def test_json_round_trip(tmp_path):
    tok = make(words=["中国"])
    path = tmp_path / "vocab.json"
    tok.save(path)
    again = Tokenizer.load(path)
    assert again.itos == tok.itos and again.encode("中国人") == tok.encode("中国人")


def test_loads_the_original_nano_layout(tmp_path):
    # the original toolkit writes exactly these four keys, ASCII-escaped
    itos = SPECIAL_TOKENS + ["a", "b", "中", "ab"]
    original = {"vocab_size": len(itos), "stoi": {t: i for i, t in enumerate(itos)}, "itos": itos,
                "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)}}
    path = tmp_path / "tokenizer_16384.json"
    path.write_text(json.dumps(original, ensure_ascii=True))
    tok = Tokenizer.load(path)
    assert tok.encode("ab中<|response_mark|>") == [10, 9, 5]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(vocab_size=99), "vocab_size 99"),
    (lambda d: d["itos"].__setitem__(3, "x"), "special token"),
    (lambda d: d["stoi"].__setitem__("a", 8), "stoi disagrees"),
    (lambda d: d.pop("itos"), "missing key"),
])
def test_bad_vocabulary_files_are_refused(tmp_path, mutate, message):
    itos = SPECIAL_TOKENS + ["a", "b"]
    d = {"vocab_size": len(itos), "stoi": {t: i for i, t in enumerate(itos)}, "itos": itos,
         "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)}}
    mutate(d)
    path = tmp_path / "v.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        Tokenizer.load(path)


def test_encode_many_matches_serial():
    tok = make(words=["中国", "学生"])
    texts = ["中国学生" * (i + 1) for i in range(50)]
    assert tok.encode_many(texts, processes=2) == [tok.encode(t) for t in texts]
