"""Continuous batching for the transformers engine.

One scheduler thread per loaded model steps every running sequence together: each step is one
forward pass for the whole batch. New requests join at step boundaries (prefilled alone, then
merged into the batch), finished or cancelled ones leave without stalling the rest, and every
sequence keeps its own sampling settings, seed, stop sequences and grammar.

The batch's KV cache is right-aligned: row i's tokens fill the last positions and the columns
before them are padding, masked out by the attention mask; position ids are per row. Models whose
cache is not a plain DynamicCache (sliding-window or linear-attention layers) keep one cache per
sequence and are stepped one sequence at a time, still interleaved with each other.

With LoRA adapters attached (runners/adapters.py) the model is a PEFT model around the same weights,
and every forward pass names each row's adapter ("__base__" for none): PEFT's mixed-adapter batches,
so requests for different adapters of one base decode in one batch. Work that changes the model
(attaching an adapter) runs on the decode thread between steps (`between_steps`).
"""

from __future__ import annotations

import inspect
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar

import torch

from errors import ModelLoadFailed
from runners.base import Chunk, FinishReason, PreparedPrompt, TokenLogprob
from runners.detokenize import IncrementalDecoder, StopMatcher
from runners.sampling import make_generator, next_token
from runners.structured import TokenConstraint

Emit = Callable[[Chunk | BaseException], None]
T = TypeVar("T")
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


class Sequence:
    """One request's decoding state: picks its tokens from logits rows and streams its chunks."""

    def __init__(
        self,
        prepared: PreparedPrompt,
        tokenizer: Any,
        eos_ids: frozenset[int],
        device: str,
        constraint: TokenConstraint | None,
        emit: Emit,
    ) -> None:
        request = prepared.request
        self.request = request
        self.options = request.options
        self.prompt_ids = prepared.token_ids
        self.model_inputs = prepared.model_inputs  # images' pixel inputs: for the prefill only
        self.budget = prepared.max_new_tokens
        self.cancelled = threading.Event()
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._emit = emit
        self._decoder = IncrementalDecoder(tokenizer, prepared.skip_special_tokens)
        self._unsent: list[int] = []  # tokens whose text has not gone out yet
        self._stops = StopMatcher(self.options.stop)
        self._generator = make_generator(self.options, device)
        self._constraint = constraint
        # Log-probabilities of tokens not yet sent: they travel with the next chunk.
        self._pending: list[TokenLogprob] | None = None if request.logprobs is None else []
        self.context: list[int] = list(self.prompt_ids)
        self.generated: list[int] = []
        self.last_token: int = self.prompt_ids[-1]
        self.adapter: str | None = None  # the PEFT adapter this sequence decodes with; None: the base

    def advance(self, logits: torch.Tensor) -> bool:
        """Consume this sequence's next-token logits row; True when the sequence has finished."""
        constraint = self._constraint
        token = next_token(
            constraint.mask(logits) if constraint else logits,
            self.options,
            self.context,
            self.generated,
            self._generator,
        )
        if constraint:
            constraint.accept(token)
        if token in self._eos_ids and not self.options.ignore_eos:
            return self._finish("stop")
        if self._pending is not None:
            self._pending.append(self._logprob(logits, token, self.request.logprobs or 0))
        self.context.append(token)
        self.generated.append(token)
        self._unsent.append(token)
        self.last_token = token
        text, hit_stop = self._stops.feed(self._decoder.push(token))
        if hit_stop or (constraint is not None and constraint.finished):
            return self._finish("stop", text)
        if len(self.generated) >= self.budget:
            return self._finish("length", text + self._stops.flush())
        if text:
            self._send(text)
        return False

    def cancel_now(self) -> None:
        self._finish("cancelled", self._stops.flush())

    def fail(self, exc: BaseException) -> None:
        self._emit(exc)

    def _finish(self, reason: FinishReason, text: str | None = None) -> bool:
        # EOS: text held back as a possible stop sequence is output after all.
        tail = self._stops.flush() if text is None else text
        self._send(
            tail,
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.generated),
            stop_sequence=self._stops.matched if reason == "stop" else None,
        )
        return True

    def _send(self, text: str, **final: Any) -> None:
        self._emit(Chunk(text, logprobs=self._pending, token_ids=self._unsent, **final))
        self._unsent = []
        if self._pending is not None:
            self._pending = []

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        """The chosen token's log-probability under the model's raw distribution (before penalties,
        temperature and grammar, like vLLM's default), with the `top` most likely tokens."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        entry = TokenLogprob(self._tokenizer.decode([token]), float(logprobs[token]))
        if top:
            values, ids = torch.topk(logprobs, top)
            entry.top = [(self._tokenizer.decode([i]), v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return entry


class KVBatch:
    """Sequences decoded in one forward pass, with their right-aligned KV cache."""

    def __init__(self, sequence: Sequence, cache: Any) -> None:
        length = len(sequence.prompt_ids)
        self.rows = [sequence]
        self.cache = cache
        self.mask = torch.ones(1, length, dtype=torch.long, device=_device_of(cache))
        self.positions = torch.tensor([length], dtype=torch.long, device=self.mask.device)

    @classmethod
    def prefilled(cls, rows: list[Sequence], cache: Any, mask: torch.Tensor) -> KVBatch:
        """Rows prefilled together, left-padded (`mask` 0 on the padding): already right-aligned."""
        batch = cls.__new__(cls)
        batch.rows, batch.cache, batch.mask = list(rows), cache, mask
        batch.positions = mask.sum(dim=1)
        return batch

    @staticmethod
    def mergeable(cache: Any) -> bool:
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))

    def absorb(self, other: KVBatch) -> None:
        """Append `other`'s rows, left-padding whichever cache is shorter."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self._pad_to(width)
        other._pad_to(width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, other.mask])
        self.positions = torch.cat([self.positions, other.positions])
        self.rows += other.rows

    def step(self, model: Any, **adapters: Any) -> None:
        """One token for every row; finished rows leave the batch."""
        inputs = torch.tensor([[s.last_token] for s in self.rows], device=self.mask.device)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = model(
            input_ids=inputs,
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
            **adapters,
        )
        self.positions += 1
        logits = out.logits[:, -1]
        done = [_advance_or_fail(row, logits[i]) for i, row in enumerate(self.rows)]
        self.keep([i for i, finished in enumerate(done) if not finished])

    def keep(self, indices: list[int]) -> None:
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not indices:
            return
        index = torch.tensor(indices, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        # Drop leading columns that are padding in every remaining row.
        start = int((self.mask.sum(dim=0) > 0).nonzero()[0])
        if start:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]

    def _pad_to(self, width: int) -> None:
        pad = width - self.mask.shape[1]
        if pad <= 0:
            return
        for layer in self.cache.layers:
            b, h, _, d = layer.keys.shape
            layer.keys = torch.cat([layer.keys.new_zeros(b, h, pad, d), layer.keys], dim=2)
            layer.values = torch.cat([layer.values.new_zeros(b, h, pad, layer.values.shape[-1]), layer.values], dim=2)
        self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], pad), self.mask], dim=1)


def _advance_or_fail(row: Sequence, logits: torch.Tensor) -> bool:
    """A row whose own step fails (its grammar, its sampling settings) ends with that error and
    leaves the batch; the other rows keep decoding. True when the row is done either way."""
    try:
        return row.advance(logits)
    except Exception as exc:
        row.fail(exc)
        return True


def _rope_delta(model: Any) -> int:
    """The offset a multi-axis rotary model (Qwen2-VL's M-RoPE) computed in an image prefill: the
    decode positions are the text positions plus it, as in transformers' own `generate`. 0 for others."""
    delta = getattr(getattr(model, "model", None), "rope_deltas", None)
    return int(delta.flatten()[0]) if delta is not None and torch.is_tensor(delta) else 0


def _device_of(cache: Any) -> torch.device:
    layers = getattr(cache, "layers", None)
    return layers[0].keys.device if layers else torch.device("cpu")


class BatchScheduler:
    """The decode loop of one model: admits waiting sequences, steps the running ones together."""

    def __init__(self, model: Any, name: str, max_batch_size: int) -> None:
        self._model = model
        self._name = name
        self._max_batch_size = max_batch_size
        self._waiting: deque[Sequence] = deque()
        self._admitting: list[Sequence] = []  # taken from the queue, not yet in a batch
        self._batches: list[KVBatch] = []
        # Whether this model's cache can be merged (learned from the first prefill): only then are
        # prompts arriving together prefilled together.
        self._mergeable: bool | None = None
        # A prefill needs the logits of the last position only: not a (prompt x vocab) matrix.
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._last_logits: dict[str, int] = {"logits_to_keep": 1} if accepts else {}
        self._wake = threading.Condition()
        self._closed = False
        self._routed = False  # the model is a PEFT model: each forward names every row's adapter
        self._chores: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._thread = threading.Thread(target=self._run, name=f"batch:{name}", daemon=True)
        self._thread.start()

    def queue_depth(self) -> int:
        return len(self._waiting)

    def batch_size(self) -> int:
        return len(self._admitting) + sum(len(b.rows) for b in self._batches)

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence (the pool's lease has admitted it: the queue is bounded there)."""
        with self._wake:
            if self._closed:
                raise ModelLoadFailed(f"model '{self._name}' is being unloaded")
            self._waiting.append(sequence)
            self._wake.notify()

    def between_steps(self, work: Callable[[], T]) -> T:
        """Run `work` on the decode thread between two steps and return its result (blocking: call
        it from a worker thread). Nothing else touches the model meanwhile."""
        done: Future[T] = Future()
        with self._wake:
            if self._closed:
                raise ModelLoadFailed(f"model '{self._name}' is being unloaded")
            self._chores.append((work, done))
            self._wake.notify()
        return done.result()

    def route_adapters(self, model: Any) -> None:
        """From now on decode with `model` (a PEFT model around the same weights), naming each row's
        adapter. Only from the decode thread (`between_steps`)."""
        self._model = model
        self._routed = True

    def _adapter_names(self, rows: list[Sequence]) -> dict[str, Any]:
        return {"adapter_names": [row.adapter or BASE_ADAPTER for row in rows]} if self._routed else {}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        for _, done in self._chores:
            done.set_exception(ModelLoadFailed(f"model '{self._name}' was unloaded"))
        self._chores.clear()
        unloaded = ModelLoadFailed(f"model '{self._name}' was unloaded")
        for sequence in [*self._waiting, *self._admitting, *(row for b in self._batches for row in b.rows)]:
            sequence.fail(unloaded)
        self._waiting.clear()
        self._batches.clear()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._waiting and not self._batches and not self._chores:
                        self._wake.wait()
                    if self._closed:
                        return
                    chores = list(self._chores)
                    self._chores.clear()
                    room = self._max_batch_size - self.batch_size()
                    self._admitting = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                for work, done in chores:
                    try:
                        done.set_result(work())
                    except BaseException as exc:
                        done.set_exception(exc)
                text_only = [s for s in self._admitting if not s.model_inputs]  # images prefill alone
                if len(text_only) > 1 and self._mergeable:
                    self._admit_together(text_only)
                    self._admitting = [s for s in self._admitting if s.model_inputs or s in text_only]
                for sequence in list(self._admitting):
                    self._guarded(partial(self._admit, sequence), [sequence])
                    self._admitting.remove(sequence)  # now in a batch, or finished
                self._drop_cancelled()
                for batch in list(self._batches):
                    step = partial(batch.step, self._model, **self._adapter_names(batch.rows))
                    self._guarded(step, batch.rows)
                self._batches = [b for b in self._batches if b.rows]

    def _guarded(self, work: Callable[[], None], rows: list[Sequence]) -> None:
        """A failure (out of memory, a bad grammar) ends the sequences involved, not the loop."""
        try:
            work()
        except Exception as exc:
            for batch in self._batches:
                if set(batch.rows) & set(rows):
                    batch.rows = []
            for row in rows:
                row.fail(exc)

    def _admit(self, sequence: Sequence) -> None:
        """Prefill the prompt alone, pick the first token, and join a batch if not finished."""
        if sequence.cancelled.is_set():
            sequence.cancel_now()
            return
        ids = torch.tensor([sequence.prompt_ids], device=self._model.device)
        images = self._prefill_inputs(sequence)
        out = self._model(
            input_ids=ids, use_cache=True, **self._last_logits, **images, **self._adapter_names([sequence])
        )
        self._mergeable = KVBatch.mergeable(out.past_key_values)
        if sequence.advance(out.logits[0, -1]):
            return
        batch = KVBatch(sequence, out.past_key_values)
        if images:  # multi-axis rotary models (Qwen2-VL) place the tokens after an image by an offset
            batch.positions += _rope_delta(self._model)
        self._join(batch)

    def _admit_together(self, sequences: list[Sequence]) -> None:
        """Prefill the prompts that arrived together in one left-padded forward pass, so a burst of
        N requests stalls the running batch for one pass instead of N. The sequences it admits (or
        finishes) leave `sequences`; on a failure of the shared pass they all stay there, to be
        admitted one by one, so one bad request cannot fail the others."""
        for sequence in [s for s in sequences if s.cancelled.is_set()]:
            sequence.cancel_now()
            sequences.remove(sequence)
        if len(sequences) < 2:
            return
        device = self._model.device
        width = max(len(s.prompt_ids) for s in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)  # padding: masked out
        mask = torch.zeros_like(ids)
        for i, sequence in enumerate(sequences):
            ids[i, width - len(sequence.prompt_ids) :] = torch.tensor(sequence.prompt_ids, device=device)
            mask[i, width - len(sequence.prompt_ids) :] = 1
        try:
            out = self._model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                use_cache=True,
                **self._last_logits,
                **self._adapter_names(sequences),
            )
        except Exception:
            return
        rows = list(sequences)
        batch = KVBatch.prefilled(rows, out.past_key_values, mask)
        logits = out.logits[:, -1]
        running = []
        for i, row in enumerate(rows):
            try:
                if not row.advance(logits[i]):
                    running.append(i)
            except Exception as exc:
                row.fail(exc)
        batch.keep(running)
        if batch.rows:
            self._join(batch)
        sequences.clear()  # only now: until joined, the rows count as admitting in batch_size()

    def _join(self, batch: KVBatch) -> None:
        shared = next((b for b in self._batches if KVBatch.mergeable(b.cache)), None)
        if shared is not None and KVBatch.mergeable(batch.cache):
            shared.absorb(batch)
        else:
            self._batches.append(batch)

    def _prefill_inputs(self, sequence: Sequence) -> dict[str, Any]:
        """A vision prompt's pixel inputs on the model's device (floats in its dtype), handed over
        once: after the prefill the images live in the KV cache and decoding is text only."""
        inputs, sequence.model_inputs = sequence.model_inputs, {}
        device, dtype = self._model.device, self._model.dtype
        return {
            k: v.to(device, dtype=dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
            for k, v in inputs.items()
        }

    def _drop_cancelled(self) -> None:
        for batch in self._batches:
            gone = [i for i, row in enumerate(batch.rows) if row.cancelled.is_set()]
            for i in gone:
                batch.rows[i].cancel_now()
            if gone:
                batch.keep([i for i in range(len(batch.rows)) if i not in gone])
