import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import data
from bench.bench_data import generate_corpus, run_measured
from tokenizer import BOS_ID, EOS_ID, INSTRUCT_ID, RESPONSE_ID, SPECIAL_TOKENS, Tokenizer

DOCS = [f"第{i}篇文章：今天天气很好，我们去公园散步，看见{i % 7}只小鸟。" for i in range(200)]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def save_vocab(path, texts, extra=()):
    tokenizer = Tokenizer(SPECIAL_TOKENS + sorted(set("".join(texts))) + list(extra))
    tokenizer.save(path)
    return str(path)


def prepare(tmp_path, inputs, *options, name="mine"):
    argv = sum((["--input", str(p)] for p in inputs), []) + ["--name", name, "--out-dir", str(tmp_path / "out"),
                                                             "--workers", "1", *options]
    data.main(argv)
    return load(tmp_path / "out" / name)


def load(directory):
    meta = json.loads((directory / "meta.json").read_text())
    splits = {}
    for split in ("train", "val"):
        ids = np.memmap(directory / f"{split}.bin", dtype=meta["dtype"], mode="r")
        mask = np.memmap(directory / f"{split}_mask.bin", dtype=np.uint8, mode="r") if meta["kind"] == "sft" else None
        splits[split] = (ids, mask)
    tokenizer = Tokenizer.load(directory / meta["tokenizer"])
    assert data.file_sha256(directory / meta["tokenizer"]) == meta["tokenizer_sha256"]
    return meta, splits, tokenizer


def pretrain_documents(ids, tokenizer):
    """<|bos|> text <|eos|> ... -> [text, ...], checking the wrapping."""
    ids = list(ids)
    starts = [i for i, t in enumerate(ids) if t == BOS_ID]
    ends = [i for i, t in enumerate(ids) if t == EOS_ID]
    assert starts[0] == 0 and ends[-1] == len(ids) - 1 and len(starts) == len(ends)
    assert all(e + 1 == s for e, s in zip(ends, starts[1:]))
    return [tokenizer.decode(ids[s + 1:e]) for s, e in zip(starts, ends)]


def sft_turns(ids, mask, tokenizer):
    """-> [(question, answer), ...] in order, checking that the mask is exactly the answers + their eos."""
    ids, mask = list(ids), list(mask)
    turns, i = [], 0
    while i < len(ids):
        assert ids[i] == INSTRUCT_ID
        r = ids.index(RESPONSE_ID, i)
        e = ids.index(EOS_ID, r)
        assert mask[i:r + 1] == [0] * (r + 1 - i)          # instruct mark, question, response mark
        assert mask[r + 1:e + 1] == [1] * (e - r)          # answer and its eos
        turns.append((tokenizer.decode(ids[i + 1:r]), tokenizer.decode(ids[r + 1:e])))
        i = e + 1
    return turns


# ------------------------------------------------------------------ formats

def test_text_lines_build_a_vocabulary_and_pack_documents(tmp_path):
    corpus = write(tmp_path / "c.txt", "\n".join(DOCS) + "\n\n  \n")
    meta, splits, tokenizer = prepare(tmp_path, [corpus], "--val-fraction", "0.2")
    assert meta["kind"] == "pretrain" and meta["dtype"] == "uint16" and meta["tokenizer"] == "vocab.json"
    assert meta["block_size"] == 256 and meta["vocab_size"] == tokenizer.vocab_size
    train = pretrain_documents(splits["train"][0], tokenizer)
    val = pretrain_documents(splits["val"][0], tokenizer)
    assert sorted(train + val) == sorted(DOCS)
    assert (meta["train_documents"], meta["val_documents"]) == (len(train), len(val))
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(splits["train"][0]), len(splits["val"][0]))
    assert 20 <= len(val) <= 60
    assert train != [d for d in DOCS if d in set(train)]  # shuffled


def test_blank_line_documents_survive_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 100)  # many chunks: no document may be cut
    paragraphs = [f"{d}\n第二行{i}" for i, d in enumerate(DOCS)]
    corpus = write(tmp_path / "p.txt", "\n\n".join(paragraphs).replace("\n\n", "\n \r\n", 10))
    meta, splits, tokenizer = prepare(tmp_path, [corpus], "--blank-line-docs")
    found = pretrain_documents(splits["train"][0], tokenizer) + pretrain_documents(splits["val"][0], tokenizer)
    assert sorted(found) == sorted(p.replace("\r", "") for p in paragraphs)


def test_jsonl_text_and_a_given_vocabulary(tmp_path):
    corpus = write(tmp_path / "c.jsonl", "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS))
    vocab = save_vocab(tmp_path / "v.json", DOCS, extra=["天气", "公园散步"])
    meta, splits, tokenizer = prepare(tmp_path, [corpus], "--tokenizer", vocab)
    assert meta["tokenizer"] == os.path.relpath(vocab, tmp_path / "out" / "mine")
    assert "公园散步" in tokenizer.stoi and tokenizer.stoi["公园散步"] in splits["train"][0]
    assert sorted(pretrain_documents(splits["train"][0], tokenizer)
                  + pretrain_documents(splits["val"][0], tokenizer)) == sorted(DOCS)


def test_sft_masks_single_and_multi_turn_records(tmp_path):
    records = [[(f"问题{i}：一加{i}等于几？", f"答案是{i + 1}。")] for i in range(60)]
    records += [[(f"你好{i}", "你好！"), (f"再见{i}", "再见。")] for i in range(40)]
    lines = [{"question": r[0][0], "answer": r[0][1]} if len(r) == 1 else
             {"messages": [{"role": role, "content": text} for turn in r for role, text in zip(("user", "assistant"), turn)]}
             for r in records]
    corpus = write(tmp_path / "qa.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    meta, splits, tokenizer = prepare(tmp_path, [corpus], "--sft", "--val-fraction", "0.2")
    assert meta["kind"] == "sft"
    found = [turn for split in ("train", "val") for turn in sft_turns(*splits[split], tokenizer)]
    assert sorted(found) == sorted(turn for r in records for turn in r)
    for i in range(40):  # the turns of a conversation stay together, in order
        assert found[found.index((f"你好{i}", "你好！")) + 1] == (f"再见{i}", "再见。")
    assert len(splits["train"][1]) == len(splits["train"][0])


def test_sft_question_longer_than_a_block_keeps_its_end(tmp_path):
    long_question = "".join(chr(0x4e00 + i) for i in range(100))
    lines = [{"question": long_question, "answer": "正面"}, {"question": "短", "answer": "负面"}]
    corpus = write(tmp_path / "qa.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    held_out = write(tmp_path / "val.jsonl", json.dumps({"question": "中", "answer": "正面"}, ensure_ascii=False) + "\n")
    meta, splits, tokenizer = prepare(tmp_path, [corpus], "--sft", "--val-input", held_out, "--block-size", "32")
    turns = sft_turns(*splits["train"], tokenizer)
    # the record fills the block: instruct mark + question + response mark + answer + eos = 32 tokens
    room = 32 - 3 - len(tokenizer.encode("正面"))
    assert (long_question[-room:], "正面") in turns and ("短", "负面") in turns


def test_val_input_holds_out_a_given_file(tmp_path):
    train = write(tmp_path / "train.txt", "\n".join(DOCS[:150]))
    val = write(tmp_path / "val.txt", "\n".join(DOCS[150:]))
    meta, splits, tokenizer = prepare(tmp_path, [train], "--val-input", val)
    assert sorted(pretrain_documents(splits["val"][0], tokenizer)) == sorted(DOCS[150:])
    assert meta["train_documents"] == 150


def test_uint32_when_the_vocabulary_exceeds_uint16(tmp_path):
    corpus = write(tmp_path / "c.txt", "\n".join(DOCS))
    vocab = save_vocab(tmp_path / "big.json", DOCS, extra=[f"词{i}" for i in range(70_000)] + ["第1"])
    meta, splits, tokenizer = prepare(tmp_path, [corpus], "--tokenizer", vocab)
    assert meta["dtype"] == "uint32" and splits["train"][0].dtype == np.uint32
    assert tokenizer.stoi["第1"] > 65535 and tokenizer.stoi["第1"] in set(splits["train"][0].tolist()
                                                                          + splits["val"][0].tolist())


def test_validation_is_held_out_by_document_and_duplicates_stay_together(tmp_path):
    corpus = write(tmp_path / "c.txt", "\n".join(DOCS + DOCS[:50]))  # 50 documents twice
    meta, splits, tokenizer = prepare(tmp_path, [corpus], "--val-fraction", "0.3")
    train = pretrain_documents(splits["train"][0], tokenizer)
    val = pretrain_documents(splits["val"][0], tokenizer)
    assert val and not set(val) & set(train)
    assert not any(v in "".join(train) for v in val)


def test_same_result_with_one_or_two_workers(tmp_path):
    corpus = write(tmp_path / "c.txt", "\n".join(DOCS))
    one = prepare(tmp_path, [corpus], name="one")
    two = prepare(tmp_path, [corpus], "--workers", "2", name="two")
    for split in ("train", "val"):
        assert np.array_equal(one[1][split][0], two[1][split][0])


# ------------------------------------------------------------------ errors

def run_cli(*argv):
    result = subprocess.run([sys.executable, "data.py", *argv], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    return result.stderr


def test_cli_errors_are_one_clean_line(tmp_path):
    assert "does not exist" in run_cli("--input", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path))
    empty = write(tmp_path / "empty.txt", "")
    assert "is empty" in run_cli("--input", empty, "--out-dir", str(tmp_path))
    blank = write(tmp_path / "blank.txt", "\n  \n\n")
    assert "corpus is empty" in run_cli("--input", blank, "--out-dir", str(tmp_path))


def test_vocabulary_too_small(tmp_path):
    corpus = write(tmp_path / "c.txt", "\n".join(DOCS))
    with pytest.raises(data.DataError, match="cannot build a vocabulary of 8 entries"):
        prepare(tmp_path, [corpus], "--vocab-size", "8")


def test_bad_json_line_is_reported_with_its_line_number(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_BYTES", 256)  # the bad line lies many chunks into the file
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in DOCS]
    lines[136] = '{"text": "unterminated'
    corpus = write(tmp_path / "c.jsonl", "\n".join(lines))
    with pytest.raises(data.DataError, match=r"c\.jsonl:137: bad JSON line"):
        prepare(tmp_path, [corpus])
    leftovers = os.listdir(tmp_path / "out" / "mine")
    assert leftovers == []  # nothing half-written, no temporary directory
    assert "c.jsonl:137: bad JSON line" in run_cli("--input", corpus, "--out-dir", str(tmp_path))


def test_sft_records_must_be_well_formed(tmp_path):
    corpus = write(tmp_path / "qa.jsonl", '{"question": "a", "answer": "b"}\n{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(data.DataError, match=r"qa\.jsonl:2: \"messages\" must alternate"):
        prepare(tmp_path, [corpus], "--sft")
    with pytest.raises(data.DataError, match="--sft needs .jsonl"):
        prepare(tmp_path, [write(tmp_path / "c.txt", "x")], "--sft")


def test_a_different_vocabulary_is_refused_unless_overwrite(tmp_path):
    corpus = write(tmp_path / "c.txt", "\n".join(DOCS))
    prepare(tmp_path, [corpus], "--tokenizer", save_vocab(tmp_path / "a.json", DOCS))
    other = save_vocab(tmp_path / "b.json", DOCS, extra=["天气"])
    with pytest.raises(data.DataError, match="another vocabulary.*--overwrite"):
        prepare(tmp_path, [corpus], "--tokenizer", other)
    assert load(tmp_path / "out" / "mine")[0]["tokenizer"].endswith("a.json")  # untouched
    meta = prepare(tmp_path, [corpus], "--tokenizer", other, "--overwrite")[0]
    assert meta["tokenizer"].endswith("b.json")


def test_too_few_documents_for_a_validation_split(tmp_path):
    with pytest.raises(data.DataError, match="split got no documents"):
        prepare(tmp_path, [write(tmp_path / "c.txt", "只有一篇文章")])


# ------------------------------------------------------------------ download

class RangeServer(ThreadingHTTPServer):
    """Serves one payload at any path, honours Range: bytes=N-, and can cut off the first responses."""

    def __init__(self, payload):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.payload, self.cut_responses, self.ranges = payload, 0, []


class RangeHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        payload, asked = self.server.payload, self.headers.get("Range")
        self.server.ranges.append(asked)
        start = int(asked.removeprefix("bytes=").split("-")[0]) if asked else 0
        if start >= len(payload):
            self.send_response(416)
            self.end_headers()
            return
        body = payload[start:]
        self.send_response(206 if asked else 200)
        if asked:
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_responses:
            self.server.cut_responses -= 1
            body = body[:len(body) // 3]  # then the connection closes
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    payload = ("\n".join(DOCS * 20) + "\n").encode("utf-8")
    httpd = RangeServer(payload)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/corpus.txt", hashlib.sha256(payload).hexdigest()
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_after_a_cut_connection_and_prepares(tmp_path, server):
    httpd, url, sha256 = server
    httpd.cut_responses = 1
    meta = prepare(tmp_path, [], "--url", url, "--sha256", sha256, name="web")[0]
    third = len(httpd.payload) // 3
    assert httpd.ranges == [None, f"bytes={third}-"]
    assert (tmp_path / "out" / "downloads" / "corpus.txt").read_bytes() == httpd.payload
    assert meta["train_documents"] + meta["val_documents"] == len(DOCS) * 20


def test_download_continues_a_partial_file_from_an_earlier_run(tmp_path, server):
    httpd, url, sha256 = server
    part = tmp_path / "corpus.txt.part"
    part.write_bytes(httpd.payload[:1000])
    path = data.download(url, str(tmp_path), sha256)
    assert httpd.ranges == ["bytes=1000-"]
    assert open(path, "rb").read() == httpd.payload and not part.exists()
    assert data.download(url, str(tmp_path), sha256) == path and len(httpd.ranges) == 1  # reused


def test_download_checksum_mismatch(tmp_path, server):
    httpd, url, _ = server
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.download(url, str(tmp_path), "0" * 64)
    assert os.listdir(tmp_path) == []


def test_download_gives_up_after_repeated_cuts(tmp_path, server):
    httpd, url, _ = server
    httpd.cut_responses = 10
    with pytest.raises(data.DataError, match="run again to resume"):
        data.download(url, str(tmp_path), attempts=2)
    assert os.path.getsize(tmp_path / "corpus.txt.part") > 0


# ------------------------------------------------------------------ the built-in corpus and memory

@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    data.prepare_builtin(str(out))
    return out


def test_builtin_corpus(builtin):
    vocab = Tokenizer.load(builtin / "vocab.json")
    assert vocab.vocab_size == 8192
    pretrain = {}
    for name in ("news", "reviews"):
        meta, splits, tokenizer = load(builtin / name)
        assert meta["kind"] == "pretrain" and meta["tokenizer"] == "../vocab.json" and tokenizer.itos == vocab.itos
        pretrain[name] = {split: set(pretrain_documents(splits[split][0], tokenizer)) for split in ("train", "val")}
    assert "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）" in pretrain["news"]["train"] | pretrain["news"]["val"]

    meta, splits, tokenizer = load(builtin / "sentiment")
    assert meta["kind"] == "sft" and meta["tokenizer"] == "../vocab.json"
    train = sft_turns(*splits["train"], tokenizer)
    assert {answer for _, answer in train} == {"正面", "负面"} and len(train) == meta["train_documents"]
    test = [json.loads(line) for line in open(builtin / "sentiment" / "test.jsonl", encoding="utf-8")]
    assert len(test) > 1000 and {r["answer"] for r in test} == {"正面", "负面"}
    test_reviews = {r["question"] for r in test}
    sft_reviews = {split: {question for question, _ in sft_turns(*splits[split], tokenizer)} for split in ("train", "val")}
    assert len(sft_reviews["train"] | sft_reviews["val"]) == meta["train_documents"] + meta["val_documents"]
    assert not test_reviews & (sft_reviews["train"] | sft_reviews["val"])
    # the reviews pretrained on are the SFT reviews, split alike (SFT cuts over-long ones from the left)
    for split in ("train", "val"):
        whole, cut = pretrain["reviews"][split] - sft_reviews[split], sft_reviews[split] - pretrain["reviews"][split]
        assert len(whole) == len(cut) < 0.02 * len(sft_reviews[split])
        assert all(any(w.endswith(c) for w in whole) for c in cut)
    known = {q for q in test_reviews if "<|unknown|>" not in q}  # decoding can't restore unknown characters
    assert not known & set().union(*pretrain["news"].values(), *pretrain["reviews"].values())


def memory_run(tmp_path, vocab, size_mb, name):
    corpus = tmp_path / f"{name}.txt"
    generate_corpus(corpus, size_mb << 20, seed=size_mb)
    seconds, peak, _ = run_measured([sys.executable, "data.py", "--input", str(corpus), "--name", name,
                                     "--tokenizer", str(vocab), "--out-dir", str(tmp_path)])
    corpus.unlink()
    return peak


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, builtin):
    small = memory_run(tmp_path, builtin / "vocab.json", 4, "small")
    large = memory_run(tmp_path, builtin / "vocab.json", 40, "large")
    assert large < small + (16 << 20), (small >> 20, large >> 20)  # far less than the 36 MB more of corpus


@pytest.mark.skipif(not os.environ.get("NANO_SLOW_TESTS"), reason="slow: set NANO_SLOW_TESTS=1")
def test_peak_memory_on_a_400_mb_corpus(tmp_path, builtin):
    assert memory_run(tmp_path, builtin / "vocab.json", 400, "huge") < 600 << 20
