"""Row maps of resized vocabularies: pad by position, align by token, and the byte ranges they
become (each run one contiguous range per checkpoint, or zeros)."""
from __future__ import annotations

from graft.engine.plan.tasks import Source
from graft.engine.plan.vocab import Run, align_map, pad_map, pieces, read_vocab, tokenizer_size


def rows_of(rowmap, role):  # noqa: ANN001, ANN201
    """Output row -> source row (None: zeros) for one role, expanded from the runs."""
    out = []
    for run in rowmap.runs:
        first = run.of(role)
        out += [None if first is None else first + i for i in range(run.count)]
    return out


def test_pad_takes_the_finetunes_rows_and_zeros_where_a_checkpoint_ends():
    m = pad_map({"target": 4, "finetuned": 6, "base": 5})
    assert m.rows == 6 and m.added == 2 and m.matched == 4 and m.by == "position"
    assert rows_of(m, "target") == [0, 1, 2, 3, None, None]
    assert rows_of(m, "base") == [0, 1, 2, 3, 4, None]
    assert rows_of(m, "finetuned") == list(range(6))
    assert [r.count for r in m.runs] == [4, 1, 1]  # cut where a checkpoint runs out of rows


def test_align_follows_tokens_through_reordering_and_additions():
    base = {"a": 0, "b": 1, "c": 2}
    target = {"b": 0, "a": 1, "c": 2, "t": 3}  # reordered, and one token of its own
    finetuned = {"a": 0, "b": 1, "c": 2, "<x>": 3}
    m = align_map({"target": target, "finetuned": finetuned, "base": base},
                  {"target": 4, "finetuned": 5, "base": 3}, "finetuned")
    assert m.rows == 5
    assert rows_of(m, "target") == [1, 0, 2, None, None]  # row 4: no token (padding), past its rows
    assert rows_of(m, "base") == [0, 1, 2, None, None]
    assert rows_of(m, "finetuned") == [0, 1, 2, 3, 4]
    assert (m.added, m.matched, m.moved, m.padding, m.dropped) == (1, 3, 2, 1, 1)


def test_a_token_beyond_a_checkpoints_rows_counts_as_missing():
    v = {"a": 0, "b": 5}
    m = align_map({"target": v, "finetuned": v, "base": v}, {"target": 2, "finetuned": 6, "base": 2}, "finetuned")
    assert rows_of(m, "target") == [0, 1, None, None, None, None]  # row 1: no token, by position


def test_pieces_are_contiguous_byte_ranges_of_each_checkpoint():
    src = {r: Source(r, f"{r}.safetensors", "BF16", 100, 100 + 6 * 4 * 2) for r in ("target", "finetuned", "base")}
    m = pad_map({"target": 4, "finetuned": 6, "base": 4})
    parts = pieces("model.embed_tokens.weight", "BF16", (4,), 1.0, src, m)
    assert [p.piece for p in parts] == [(0, 6), (4, 6)]
    assert parts[0].target.begin == 100 and parts[0].target.end == 100 + 4 * 8
    (term,) = parts[1].terms
    assert term.finetuned.begin == 100 + 4 * 8 and term.finetuned.end == 100 + 6 * 8
    assert parts[1].target.zero and term.base.zero and not term.finetuned.zero
    assert parts[0].stored() == [("model.embed_tokens.weight", "BF16", (6, 4))] and parts[1].stored() == []
    assert sum(p.nbytes for p in parts) == 6 * 4 * 2


def test_read_vocab_reads_bpe_unigram_and_added_tokens():
    bpe = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}, "added_tokens": [{"id": 7, "content": "<x>"}]}
    assert read_vocab(bpe) == {"a": 0, "b": 1, "<x>": 7} and tokenizer_size(read_vocab(bpe)) == 8
    unigram = {"model": {"type": "Unigram", "vocab": [["a", -1.0], ["b", -2.0]]}, "added_tokens": []}
    assert read_vocab(unigram) == {"a": 0, "b": 1}
    assert read_vocab({"model": {}}) is None and read_vocab(None) is None


def test_a_run_names_each_roles_first_row():
    assert Run(0, 3, (("target", 1), ("finetuned", 0), ("base", None))).of("base") is None


def test_rows_the_base_lacks_and_the_target_has_are_the_targets_in_pad():
    """A target that already grew the fine-tune's tokens: those rows have no difference to transfer
    (t + alpha * f would add a second embedding of the token); the fine-tune's are not read."""
    m = pad_map({"target": 6, "finetuned": 6, "base": 4})
    assert rows_of(m, "target") == list(range(6))
    assert rows_of(m, "finetuned") == [0, 1, 2, 3, None, None]
    assert rows_of(m, "base") == [0, 1, 2, 3, None, None]
    assert (m.matched, m.kept, m.added) == (4, 2, 0)
    assert m.describe() == ("6 rows, 4 matched by position, 2 the target's unchanged (the base lacks them: "
                            "no difference to transfer), 0 added from the fine-tune (zeros in the "
                            "checkpoints that lack them)")
    m = pad_map({"target": 5, "finetuned": 7, "base": 4})  # one grown by the target, two new
    assert rows_of(m, "finetuned") == [0, 1, 2, 3, None, 5, 6]
    assert (m.matched, m.kept, m.added) == (4, 1, 2)


def test_tokens_the_base_lacks_and_the_target_has_are_the_targets_in_align():
    base = {"a": 0, "b": 1}
    target = {"a": 0, "b": 1, "<x>": 2}  # grew <x> itself
    finetuned = {"a": 0, "b": 1, "<y>": 2, "<x>": 3}
    m = align_map({"target": target, "finetuned": finetuned, "base": base},
                  {"target": 3, "finetuned": 5, "base": 2}, "finetuned")
    assert rows_of(m, "target") == [0, 1, None, 2, None]
    assert rows_of(m, "finetuned") == [0, 1, 2, None, 4]  # row 4: padding, the fine-tune's alone
    assert rows_of(m, "base") == [0, 1, None, None, None]
    assert (m.matched, m.kept, m.added, m.padding) == (2, 1, 1, 1)
    assert "1 the target's unchanged" in m.describe()
