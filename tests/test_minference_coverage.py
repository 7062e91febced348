"""`benchmarks/minference_coverage.py`'s readers on hand-made lines whose keys and blocks are counted by hand."""

from __future__ import annotations

import torch

from tests.benchmark_modules import load_benchmark

cov = load_benchmark("minference_coverage")


def test_one_head_columns_and_diagonals():
    # A chunk of two 64-query blocks (rows 2 and 3) after 128 cached tokens; column 5, diagonals 0, 100, 150.
    c = cov.reader_coverage(128, 256, 64, [torch.tensor([5])], [torch.tensor([0, 100, 150])], [0])
    assert c["causal_keys"].tolist() == [192.0, 256.0]
    # Row 2 (queries 128-191): diagonal 0 -> [128, 191], 100 -> [28, 91], 150 -> [0, 41]: 64 + 64 + 42 keys, 28-41
    # read twice (92 + 64 = 156), column 5 already inside; row 3: [192, 255], [92, 155], [42, 105], column 5: 179.
    assert c["tok"][0].tolist() == [156.0, 179.0]
    assert c["ranges"][0].tolist() == [2.0, 2.0]  # the two lower ranges overlap and merge
    # Blocks: row 2 crosses 0 (and holds column 5), 1 and 2: 3 of 3; row 3 crosses 1, 2, 3 and holds 0: 4 of 4.
    assert c["blk"][0].tolist() == [3.0, 4.0]


def test_union_over_a_kv_heads_q_heads_and_non_causal_columns():
    # Head 1's columns 200 and 250 are past row 2's last query (dropped there); diagonals 0 and 64 touch (not merged).
    c = cov.reader_coverage(128, 256, 64, [torch.tensor([5]), torch.tensor([200, 250])],
                            [torch.tensor([0]), torch.tensor([0, 64])], [0, 0])
    assert c["tok"][1].tolist() == [128.0, 128.0]  # row 3: [192, 255] and [128, 191]; its columns inside them
    assert c["ranges"][1].tolist() == [2.0, 2.0]
    assert c["tok_union"].tolist() == [[129.0, 129.0]]  # head 0's column 5 beside head 1's ranges
    assert c["blk"].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert c["blk_union"].tolist() == [[3.0, 3.0]]


def test_unions_stay_within_each_kv_head():
    c = cov.reader_coverage(0, 128, 64, [torch.tensor([3]), torch.tensor([70])], [torch.tensor([0]), torch.tensor([0])],
                            [0, 1])
    assert c["tok_union"].tolist() == c["tok"].tolist()
    assert c["blk_union"].tolist() == c["blk"].tolist()
