"""The synthetic retrieval task: key→value records scattered through filler, then a query for one key.

With one record (the sizes in `build`) it is passkey retrieval; with several it is associative
recall among distractors, which the 2-layer model did not learn within a CPU budget.

A context of `length` tokens is filler words with `pairs` records `k v1 .. vL` inserted at random,
non-overlapping positions (distinct keys; each value slot's symbols distinct within a context, so
"the token after v1" is one position). A prompt ends with `Q k` for one of the keys; the answer is
`v1 .. vL`. Every answer token is one induction step (the token after the earlier occurrence of the
current token: `k` → `v1` → `v2` ...), the circuit a 2-layer model learns fastest. The first answer
token comes from the prompt's forward (the prefill, which attends exactly); `v2 .. vL` come from
decode steps, which is where top-k block attention decides what the model sees, so a passkey is
right under top-k only if those steps still find the record. Training sequences append several queries, keys drawn with
replacement (a loss on every answer token of each: more signal per long sequence); a passkey prompt
has exactly one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.recall.vocab import Vocab

IGNORE = -100  # label of positions without a loss (HF's ignore_index)


@dataclass(frozen=True)
class RecallTask:
    """Sizes of the task; the vocabulary follows from them."""

    pairs: int = 8
    value_tokens: int = 4
    keys: int = 128
    values_per_slot: int = 100
    fillers: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.pairs <= min(self.keys, self.values_per_slot):
            raise ValueError(f"pairs must be in 1..{min(self.keys, self.values_per_slot)} (got {self.pairs})")
        if self.value_tokens < 1 or self.fillers < 1:
            raise ValueError("value_tokens and fillers must be >= 1")

    @property
    def vocab(self) -> Vocab:
        return Vocab(self.fillers, self.keys, self.value_tokens, self.values_per_slot)

    @property
    def record(self) -> int:
        """Tokens of one inserted pair: the key and its value."""
        return 1 + self.value_tokens

    @property
    def query(self) -> int:
        """Tokens of one query with its answer: `Q k v1 .. vL`."""
        return 2 + self.value_tokens

    def min_length(self) -> int:
        return self.pairs * self.record + 2


@dataclass
class Batch:
    """Sampled sequences: ids (B, T), labels (B, T), and each query's answer (B, Q, L)."""

    ids: torch.Tensor
    labels: torch.Tensor
    answers: torch.Tensor


def sample(task: RecallTask, batch: int, length: int, queries: int, g: torch.Generator) -> Batch:
    """`batch` rows of a context of `length - 2` tokens and `queries` queries with their answers.

    A row's prompt (context + `Q k` of the first query) is exactly `length` tokens; the rest of the
    row is `v1 .. vL` and the further queries. Labels are the answer tokens, IGNORE elsewhere."""
    if length < task.min_length():
        raise ValueError(f"length {length} is too short for {task.pairs} pairs (need >= {task.min_length()})")
    if queries < 1:
        raise ValueError(f"queries must be >= 1 (got {queries})")
    v = task.vocab
    ctx, rec, L = length - 2, task.record, task.value_tokens
    fill = torch.tensor(v.filler_ids)[torch.randint(len(v.filler_ids), (batch, ctx), generator=g)]
    keys = torch.stack([torch.randperm(task.keys, generator=g)[:task.pairs] for _ in range(batch)]) + v.key_ids[0]
    vals = torch.stack([torch.stack([torch.randperm(task.values_per_slot, generator=g)[:task.pairs] + v.value_ids(s)[0]
                                     for s in range(L)], -1) for _ in range(batch)])  # (B, P, L)
    records = torch.cat([keys[:, :, None], vals], -1)  # (B, P, 1+L)
    # non-overlapping starts: sorted draws from the room left, shifted by the records before each
    room = ctx - task.pairs * rec
    starts = torch.sort(torch.randint(room + 1, (batch, task.pairs), generator=g), -1).values
    starts = starts + torch.arange(task.pairs) * rec  # (B, P)
    cols = starts[:, :, None] + torch.arange(rec)  # (B, P, 1+L)
    fill.scatter_(1, cols.reshape(batch, -1), records.reshape(batch, -1))
    # drawn with replacement: asking each record once would let the last answer follow by elimination
    # (measured: a model that learned that answered the last query 0.84-0.97 right and the first 0.25)
    asked = torch.randint(task.pairs, (batch, queries), generator=g)  # (B, Q)
    rows = torch.arange(batch)[:, None]
    answers = vals[rows, asked]  # (B, Q, L)
    tail = torch.cat([torch.full((batch, queries, 1), v.query_id), keys[rows, asked][:, :, None], answers], -1)
    ids = torch.cat([fill, tail.reshape(batch, -1)], 1)
    labels = torch.cat([torch.full((batch, ctx), IGNORE),
                        torch.cat([torch.full((batch, queries, 2), IGNORE), answers], -1).reshape(batch, -1)], 1)
    return Batch(ids, labels, answers)


def passkey_prompts(task: RecallTask, n: int, length: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """`n` prompts of exactly `length` tokens ending with `Q k`, and each one's answer `v1 .. vL`."""
    b = sample(task, n, length, 1, torch.Generator().manual_seed(seed))
    return b.ids[:, :length].tolist(), b.answers[:, 0].tolist()


def accuracy(generated: list[list[int]], answers: list[list[int]]) -> float:
    """Share of rows whose first len(answer) generated tokens are the answer exactly."""
    hits = [list(g[:len(a)]) == list(a) for g, a in zip(generated, answers)]
    return sum(hits) / max(1, len(hits))
