"""The block manager alone, on sequences without a model: allocation reuses a computed prefix by its chained
hashes, counts free cached blocks exactly, and evicts the least recently freed first."""
from app.engine.block_manager import BlockManager
from app.engine.request import Task
from app.engine.sampling import SamplingParams
from app.engine.sequence import Sequence

B = 4  # positions per block


def seq(tokens: list[int], task: Task = Task.GENERATE) -> Sequence:
    return Sequence(None, tokens, task, SamplingParams(max_tokens=1))


def computed(blocks: BlockManager, s: Sequence) -> None:
    """As after the steps that prefill the whole sequence."""
    s.num_cached = s.prefill_target
    blocks.hash_blocks(s)


def test_a_computed_prefix_is_reused_and_counted():
    blocks = BlockManager(8, B)  # 7 usable
    first = seq(list(range(10)))  # 2 full blocks + 2 tokens
    assert blocks.can_allocate(first)
    blocks.allocate(first)
    computed(blocks, first)
    first_blocks = first.block_table
    blocks.deallocate(first)
    assert (blocks.num_free, blocks.num_cached_free) == (7, 2)  # the 2 full blocks stay cached

    second = seq(list(range(10)) + [99])
    blocks.allocate(second)
    assert second.block_table[:2] == first_blocks[:2] and second.num_cached == 8
    assert (blocks.query_tokens, blocks.hit_tokens) == (10 + 11, 8)
    assert (blocks.num_free, blocks.num_cached_free) == (4, 0)  # 2 revived, 1 fresh taken

    tagging = seq(list(range(10)), Task.TAG)  # needs every text token's hidden state: no text hits
    blocks.allocate(tagging)
    assert tagging.num_cached == 0 and not set(tagging.block_table) & set(second.block_table)


def test_admission_counts_revived_blocks_against_the_free_ones():
    blocks = BlockManager(4, B)  # 3 usable
    first = seq(list(range(8)))
    blocks.allocate(first)
    computed(blocks, first)
    blocks.deallocate(first)
    # 9 tokens, 3 blocks: 2 cached (revived from the free list) + 1 fresh = all 3 usable blocks
    assert blocks.can_allocate(seq(list(range(9))))
    assert not blocks.can_allocate(seq(list(range(13))))  # 2 revived + 2 fresh > 3


def test_a_fresh_block_evicts_the_least_recently_freed_cached_one():
    blocks = BlockManager(6, B)  # 5 usable
    old, new = seq(list(range(4)) + [50]), seq(list(range(100, 104)) + [51])  # a full block + 1 token each
    for s in (old, new):
        blocks.allocate(s)
        computed(blocks, s)
    blocks.deallocate(old)
    blocks.deallocate(new)
    assert (blocks.num_free, blocks.num_cached_free) == (5, 2)
    blocks.allocate(seq([7] * 9))  # 3 fresh blocks: the never-used one, then old's two (freed before new's)
    assert (blocks.num_free, blocks.num_cached_free, len(blocks.hash_to_block)) == (2, 1, 1)
    again = seq(list(range(100, 104)) + [51])
    blocks.allocate(again)
    assert again.num_cached == 4  # new's block was kept
