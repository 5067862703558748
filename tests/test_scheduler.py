"""The scheduler with a real BlockManager and no model: first come first served, the chunked-prefill token
budget, admission by free blocks (the queue head is never skipped), preemption of the youngest."""
from app.engine.block_manager import BlockManager
from app.engine.sampling import SamplingParams, TokenChoice
from app.engine.scheduler import Scheduler, StepResult
from app.engine.sequence import Sequence, Status
from prompt_store.format import Task

B = 4  # positions per block


class NoText:
    """The decoder of a sequence whose text nobody reads."""
    text = ""

    def add(self, token_id: int) -> None:
        pass


def seq(n: int, first: int) -> Sequence:
    """n distinct prompt tokens (no two sequences share a block, so no prefix-cache hits)."""
    return Sequence(None, list(range(first, first + n)), Task.GENERATE, SamplingParams(max_tokens=100), NoText())


def scheduler(num_blocks: int, max_batched_tokens: int = 1000, max_num_seqs: int = 8, *seqs: Sequence) -> Scheduler:
    s = Scheduler(BlockManager(num_blocks, B), max_batched_tokens, max_num_seqs, frozenset())
    s.waiting.extend(seqs)
    return s


def a_token_each(step) -> StepResult:
    return StepResult(tokens={s.request_id: TokenChoice(7) for s in step.sequences})


def test_first_come_first_served_within_the_token_budget_then_chunks_continue():
    a, b, c = seq(6, 100), seq(6, 200), seq(3, 300)
    s = scheduler(64, 10, 8, a, b, c)
    step = s.schedule()
    assert step.decode == [] and step.prefill == [(a, 6), (b, 4)]  # b's prompt is cut to the 4 tokens left
    assert s.running == [a, b] and list(s.waiting) == [c]

    changed = s.postprocess(step, StepResult(tokens={a.request_id: TokenChoice(7)}), set())
    assert changed == [a] and a.output_ids == [7] and (a.num_cached, b.num_cached) == (6, 4)

    step = s.schedule()  # a decodes (1 token), b finishes its prompt (2), c is admitted (3)
    assert step.decode == [a] and step.prefill == [(b, 2), (c, 3)]
    assert s.running == [a, b, c] and not s.waiting


def test_admission_waits_for_free_blocks_and_never_skips_the_head():
    a, b, c = seq(8, 100), seq(8, 200), seq(4, 300)  # 2, 2 and 1 blocks
    s = scheduler(4, 1000, 8, a, b, c)  # 3 usable blocks (one is scratch)
    step = s.schedule()
    assert step.prefill == [(a, 8)] and s.running == [a]
    assert list(s.waiting) == [b, c]  # c would fit, but b is first
    assert s.blocks.num_free == 1 and len(a.block_table) == 2


def test_max_num_seqs_caps_the_running_sequences():
    seqs = [seq(2, 100 * i) for i in range(1, 4)]
    s = scheduler(64, 1000, 2, *seqs)
    assert s.schedule().prefill == [(seqs[0], 2), (seqs[1], 2)] and list(s.waiting) == [seqs[2]]


def test_a_decoder_without_a_block_preempts_the_youngest():
    a, b, c, d = (seq(B, 100 * i) for i in range(1, 5))  # one full block each
    s = scheduler(5, 1000, 8, a, b, c, d)  # 4 usable blocks: all four admitted, none left
    step = s.schedule()
    assert [x for x, _ in step.prefill] == [a, b, c, d] and s.blocks.num_free == 0
    s.postprocess(step, a_token_each(step), set())

    step = s.schedule()  # each decode writes position 4: a new block; d's then c's are taken back
    assert step.decode == [a, b] and step.prefill == []
    assert s.running == [a, b] and list(s.waiting) == [c, d] and s.num_preemptions == 2
    for preempted in (c, d):
        assert preempted.status == Status.WAITING and preempted.num_cached == 0 and preempted.block_table == []
        assert preempted.output_ids == [7] and preempted.prefill_target == B  # recomputed on its return
    assert [len(x.block_table) for x in (a, b)] == [2, 2]


def test_finished_sequences_release_their_blocks():
    a = Sequence(None, [1, 2, 3], Task.GENERATE, SamplingParams(max_tokens=1), NoText())
    s = scheduler(8, 1000, 8, a)
    step = s.schedule()
    assert s.blocks.num_free == 6
    assert s.postprocess(step, a_token_each(step), set()) == [a]
    assert a.status == Status.FINISHED and a.finish_reason == "length"
    assert s.running == [] and s.blocks.num_free == 7
