import json

import pytest
import torch

from expertkit.config import DomainConfig
from expertkit.data import Blocks, TrainingStream, load_corpus, make_blocks, pack_sft
from expertkit.errors import ExpertkitError


def domain(path, **source):
    return DomainConfig(name="d", source={"path": str(path), **source})


def sft_domain(path):
    return DomainConfig(name="d", task="sft", source={"path": str(path)})


def test_text_one_document_per_line_and_deterministic_split(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n".join(f"document number {i}" for i in range(50)))
    a, b = load_corpus(domain(f)), load_corpus(domain(f))
    assert sum(len(v) for v in a.splits.values()) == 50
    assert a.splits == b.splits
    assert len(a.splits["test"]) == 5 and len(a.splits["valid"]) == 5


def test_blank_line_separated_documents(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n\n".join(f"line one of {i}\nline two of {i}" for i in range(20)))
    corpus = load_corpus(domain(f))
    docs = [ex.text for split in corpus.splits.values() for ex in split]
    assert len(docs) == 20 and all("\n" in d for d in docs)


def test_folder_with_ready_made_splits_keeps_them(tmp_path):
    for split, n in (("train", 8), ("valid", 2), ("test", 3)):
        (tmp_path / f"{split}.txt").write_text("\n".join(f"{split} {i}" for i in range(n)))
    corpus = load_corpus(domain(tmp_path))
    assert [len(corpus.splits[s]) for s in ("train", "valid", "test")] == [8, 2, 3]
    assert all(ex.text.startswith("test") for ex in corpus.splits["test"])


def test_jsonl_text_field(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(20)))
    corpus = load_corpus(domain(f, text_field="body"))
    assert sum(len(v) for v in corpus.splits.values()) == 20


def test_jsonl_missing_field_is_named(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ExpertkitError, match=r"a.jsonl:1: no string field \['text'\]"):
        load_corpus(domain(f))


def test_jsonl_bad_line_is_located(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "x"}) + "\n{oops\n")
    with pytest.raises(ExpertkitError, match=r"a.jsonl:2: invalid JSON"):
        load_corpus(domain(f))


def test_hf_datasets_local_files(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(30)))
    d = DomainConfig(name="d", source={"hf_dataset": "json", "hf_data_files": [str(f)]})
    corpus = load_corpus(d)
    assert sum(len(v) for v in corpus.splits.values()) == 30


def test_missing_file(tmp_path):
    with pytest.raises(ExpertkitError, match="data path not found"):
        load_corpus(domain(tmp_path / "missing.txt"))


def test_empty_corpus(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("\n  \n\n")
    with pytest.raises(ExpertkitError, match="corpus is empty"):
        load_corpus(domain(f))


def test_non_utf8_bytes(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ExpertkitError, match=r"not UTF-8 \(bad byte 0xe9 at offset 3\)"):
        load_corpus(domain(f))


def test_sft_loss_only_on_response(tmp_path, micro_base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_base_dir)
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Q{i}: what?", "response": f" A{i}."}) + "\n" for i in range(20)))
    corpus = load_corpus(sft_domain(f))
    blocks = pack_sft(tok, corpus.splits["train"], 32)
    ex = corpus.splits["train"][0]
    n_prompt = len(tok(ex.prompt, add_special_tokens=False)["input_ids"])
    n_resp = len(tok(ex.response, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert (blocks.labels[0, :n_prompt] == -100).all()
    assert (blocks.labels[0, n_prompt:n_prompt + n_resp] != -100).all()
    assert (blocks.labels[0, n_prompt + n_resp:] == -100).all()
    assert int(blocks.attention_mask[0].sum()) == n_prompt + n_resp


def test_packing_drops_remainder_and_separates_with_eos(tmp_path, micro_base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_base_dir)
    f = tmp_path / "a.txt"
    f.write_text("\n".join(f"some words here number {i}" for i in range(60)))
    blocks = make_blocks(tok, load_corpus(domain(f, documents="line")), "train", 16)
    assert blocks.input_ids.shape[1] == 16
    assert (blocks.input_ids == tok.eos_token_id).any()
    assert torch.equal(blocks.input_ids, blocks.labels)


def test_a_file_without_empty_lines_is_one_running_text_by_default(tmp_path, micro_base_dir):
    """Source code has one line per line: an end-of-text after every line would teach the model to stop there."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_base_dir)
    lines = [f"    x{i} = f(x{i - 1})" for i in range(1, 400)]
    f = tmp_path / "code.txt"
    f.write_text("def f(x):\n" + "\n".join(lines) + "\n")
    corpus = load_corpus(domain(f))
    assert corpus.reading == "stream"
    pieces = [ex.text for split in corpus.splits.values() for ex in split]
    assert sorted("".join(pieces).splitlines()) == sorted(["def f(x):", *lines])  # every line, nothing added
    assert all(p.endswith("\n") for p in pieces)
    blocks = make_blocks(tok, corpus, "train", 16)
    assert not (blocks.input_ids == tok.eos_token_id).any()  # no end-of-text between lines
    assert load_corpus(domain(f, documents="line")).reading == "line"
    (tmp_path / "docs.txt").write_text("first document\nstill the first\n\nsecond document\n" * 20)
    assert load_corpus(domain(tmp_path / "docs.txt")).reading == "blank_line"


def test_a_folder_mixing_records_and_running_text_separates_only_the_records(tmp_path, micro_base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_base_dir)
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "notes.jsonl").write_text("".join(json.dumps({"text": f"note {i} about things"}) + "\n"
                                                for i in range(300)))
    (folder / "code.txt").write_text("".join(f"x{i} = f(x{i - 1})\n" for i in range(1, 600)))
    corpus = load_corpus(domain(folder))
    assert corpus.reading == "records+stream"
    pieces = [ex for split in corpus.splits.values() for ex in split]
    assert all(ex.continues == ex.text.startswith("x") for ex in pieces)
    stream_only = [ex for ex in corpus.splits["train"] if ex.continues]
    blocks = make_blocks(tok, type(corpus)("d", {"train": stream_only}), "train", 16)
    assert not (blocks.input_ids == tok.eos_token_id).any()
    records_only = [ex for ex in corpus.splits["train"] if not ex.continues]
    n_eos = int((make_blocks(tok, type(corpus)("d", {"train": records_only}), "train", 16).input_ids
                 == tok.eos_token_id).sum())
    assert n_eos > 0


def bos_tokenizer(micro_base_dir):
    """The micro tokenizer made to put a BOS token before every text, as Gemma's does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(micro_base_dir)
    bos = tok.pad_token_id  # any special token serves as the BOS of this test
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{tok.pad_token} $A",
                                                              special_tokens=[(tok.pad_token, bos)])
    assert tok("ab")["input_ids"][0] == bos
    return tok, bos


def test_every_text_path_starts_with_the_tokenizers_bos(tmp_path, micro_base_dir):
    from expertkit.encoding import encode_texts, special_prefix
    from expertkit.routing import Prompts
    from expertkit.runtime.tokens import encode_prompts

    tok, bos = bos_tokenizer(micro_base_dir)
    assert special_prefix(tok) == [bos]
    plain = tok("patient dose", add_special_tokens=False)["input_ids"]
    assert encode_texts(tok, ["patient dose"]) == [[bos, *plain]]
    assert encode_texts(tok, [tok.pad_token + "patient dose"]) == [[bos, *plain]]  # never twice
    assert encode_prompts(tok, [""]) == [[bos]]
    assert Prompts.from_texts(tok, ["patient dose"]).ids == [[bos, *plain]]
    f = tmp_path / "a.txt"
    f.write_text("\n".join(f"some words here number {i}" for i in range(60)))
    blocks = make_blocks(tok, load_corpus(domain(f)), "train", 16)
    assert (blocks.input_ids[:, 0] == bos).all() and (blocks.labels[:, 0] == -100).all()
    assert not (blocks.input_ids[:, 1:] == bos).any()
    assert blocks.input_ids.shape[1] == 16


def _blocks(value: int, n: int = 10) -> Blocks:
    ids = torch.full((n, 4), value)
    return Blocks(ids, ids.clone(), torch.ones_like(ids))


def test_stream_is_a_function_of_seed_and_step():
    s1 = TrainingStream.with_replay(_blocks(1), _blocks(2), 0.25, 8, seed=3)
    s2 = TrainingStream.with_replay(_blocks(1), _blocks(2), 0.25, 8, seed=3)
    assert torch.equal(s1.batch(5).input_ids, s2.batch(5).input_ids)
    share = torch.cat([s1.batch(k).input_ids[:, 0] for k in range(200)]).eq(2).float().mean()
    assert 0.2 < share < 0.3


def test_a_stream_started_further_on_draws_the_batches_after_those_before_it():
    blocks = Blocks(torch.arange(40).view(10, 4), torch.arange(40).view(10, 4), torch.ones(10, 4, dtype=torch.long))
    whole = TrainingStream.with_replay(blocks, _blocks(99), 0.25, 8, seed=3)
    later = TrainingStream.with_replay(blocks, _blocks(99), 0.25, 8, seed=3, first_batch=180)
    assert all(torch.equal(later.batch(k).input_ids, whole.batch(180 + k).input_ids) for k in range(3))
    assert not torch.equal(later.batch(0).input_ids, whole.batch(0).input_ids)


def test_stream_without_replay_uses_only_the_domain():
    s = TrainingStream.with_replay(_blocks(1), _blocks(2), 0.0, 8, seed=0)
    assert s.batch(0).input_ids.eq(1).all()
