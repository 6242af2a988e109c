"""Continuous batching for the transformers engine.

One scheduler thread per loaded model steps every running sequence together: each step is one
forward pass for the whole batch. New requests join at step boundaries and finished or cancelled
ones leave without stalling the rest; every sequence keeps its own sampling settings, seed, stop
sequences and grammar.

A step of the loop: one chunk (PREFILL_CHUNK positions) of the oldest waiting prefill (prompts
that arrived together are prefilled as one left-padded batch), then one decode pass. So a new
request delays the running ones by one chunk at a time, never by its whole prompt.

Sequences whose cache is full attention (DynamicLayer) decode over one SlotCache
(runners/kv_cache.py): a row per sequence, written in place, so a step copies only the new token's
key and value. Models with sliding-window or linear-attention layers (or an attention that takes no
4-D mask) keep one cache per sequence, prefilled whole, and are stepped one sequence at a time,
still interleaved with each other.

With LoRA adapters attached (runners/adapters.py) the model is a PEFT model around the same weights,
and every forward pass (prefill chunks and decode steps) names each row's adapter ("__base__" for
none): PEFT's mixed-adapter batches, so requests for different adapters of one base decode in one
batch. Work that changes the model (attaching an adapter) runs on the decode thread between steps
(`between_steps`).

Why not transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager` with
paged attention): it samples with one GenerationConfig per manager, with no per-request seed,
grammar, stop strings, logprobs, image inputs or adapters, and on this CPU it measured slower than
this loop on the benchmark model (`python -m bench.decode_loop`).
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
from runners.kv_cache import SlotCache, decode_mask, mask_kind
from runners.sampling import make_generator, next_token
from runners.structured import TokenConstraint

Emit = Callable[[Chunk | BaseException], None]
T = TypeVar("T")
BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch

# Prompt positions prefilled per scheduler step: a long prompt holds the running sequences up for one
# chunk's forward pass at a time (tens of ms for a small model on a CPU), not for its whole prefill.
PREFILL_CHUNK = 256


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
    """One sequence whose cache cannot share a SlotCache (sliding-window or linear-attention layers,
    or an attention implementation that takes no 4-D mask), decoded over its own cache."""

    def __init__(self, sequence: Sequence, cache: Any) -> None:
        length = len(sequence.prompt_ids)
        self.rows = [sequence]
        self.cache = cache
        self.mask = torch.ones(1, length, dtype=torch.long, device=_device_of(cache))
        self.positions = torch.tensor([length], dtype=torch.long, device=self.mask.device)

    def step(self, model: Any, **adapters: Any) -> None:
        """One token; a finished row leaves the batch."""
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
        self.rows = [self.rows[i] for i in indices]


class SlotBatch:
    """Every running sequence whose cache fits a SlotCache, decoded together: one forward pass per
    step for all of them, each row at its own length and position (runners/kv_cache.py)."""

    def __init__(self, prefilled: Any, boolean_mask: bool) -> None:
        self.rows: list[Sequence] = []
        self.cache = SlotCache.like(prefilled)
        self.lengths: list[int] = []  # tokens in each row's cache
        self.positions: list[int] = []  # each row's next position id (its length, plus a rope offset)
        self._dtype = self.cache.layers[0].keys.dtype
        self._boolean_mask = boolean_mask

    @staticmethod
    def fits(cache: Any) -> bool:
        """A DynamicCache of full-attention layers only (sliding windows keep a cache of their own)."""
        from transformers.cache_utils import DynamicLayer

        layers: list[Any] = getattr(cache, "layers", None) or []
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def add(self, sequence: Sequence, prefilled: Any, source_row: int, length: int, offset: int = 0) -> None:
        """Join with the `length` cached tokens of row `source_row` of a prefill's cache."""
        self.cache.write_prefill(len(self.rows), prefilled, source_row, length)
        self.rows.append(sequence)
        self.lengths.append(length)
        self.positions.append(length + offset)

    def step(self, model: Any, **adapters: Any) -> None:
        """One token for every row; finished rows leave the batch."""
        device = self.cache.device
        lengths = torch.tensor(self.lengths, device=device)
        width = max(self.lengths) + 1
        self.cache.begin_step(lengths, width)
        # Rows all of one length see every column: no mask, so SDPA takes its unmasked kernel (transformers
        # skips the mask it would build for one query position over a full cache).
        level = self._boolean_mask and min(self.lengths) == width - 1
        out = model(
            input_ids=torch.tensor([[s.last_token] for s in self.rows], device=device),
            attention_mask=None if level else decode_mask(lengths, width, self._dtype, self._boolean_mask),
            position_ids=torch.tensor(self.positions, device=device)[:, None],
            past_key_values=self.cache,
            use_cache=True,
            **adapters,
        )
        self.lengths = [n + 1 for n in self.lengths]
        self.positions = [p + 1 for p in self.positions]
        logits = out.logits[:, -1]
        done = [_advance_or_fail(row, logits[i]) for i, row in enumerate(self.rows)]
        self.keep([i for i, finished in enumerate(done) if not finished])

    def keep(self, indices: list[int]) -> None:
        if len(indices) == len(self.rows):
            return
        if indices:
            self.cache.compact(indices, max(self.lengths))
        self.rows = [self.rows[i] for i in indices]
        self.lengths = [self.lengths[i] for i in indices]
        self.positions = [self.positions[i] for i in indices]


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


class Prefill:
    """Prompts prefilled together in one left-padded batch (padding masked out), a chunk of
    positions per scheduler step, so a long prompt delays the running sequences by one chunk's
    forward pass at a time instead of its whole prefill."""

    def __init__(self, rows: list[Sequence], device: torch.device) -> None:
        self.rows = rows
        width = max(len(s.prompt_ids) for s in rows)
        self.ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)  # padding: masked out
        self.mask = torch.zeros_like(self.ids)
        for i, sequence in enumerate(rows):
            self.ids[i, width - len(sequence.prompt_ids) :] = torch.tensor(sequence.prompt_ids, device=device)
            self.mask[i, width - len(sequence.prompt_ids) :] = 1
        self.positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        self.cache: Any = None
        self.done = 0  # positions prefilled so far

    def advance(self, model: Any, chunk: int | None, extra: dict[str, Any]) -> torch.Tensor | None:
        """Prefill the next `chunk` positions (None: all the rest); the last position's logits once
        the prompts are done."""
        width = self.ids.shape[1]
        end = width if chunk is None else min(self.done + chunk, width)
        out = model(
            input_ids=self.ids[:, self.done : end],
            attention_mask=self.mask[:, :end],
            position_ids=self.positions[:, self.done : end],
            past_key_values=self.cache,
            use_cache=True,
            **extra,
        )
        self.cache, self.done = out.past_key_values, end
        return out.logits[:, -1] if end == width else None


class BatchScheduler:
    """The decode loop of one model: prefills waiting sequences a chunk at a time between decode
    steps, and steps the running ones together."""

    def __init__(self, model: Any, name: str, max_batch_size: int) -> None:
        self._model = model
        self._name = name
        self._max_batch_size = max_batch_size
        self._waiting: deque[Sequence] = deque()
        self._admitting: list[Sequence] = []  # taken from the queue, not yet decoding (being prefilled)
        self._prefills: deque[Prefill] = deque()
        self._slots: SlotBatch | None = None  # every sequence whose cache fits a SlotCache
        self._singles: list[KVBatch] = []  # the others, one cache each
        # How a decode step hands the attention its 4-D mask; None: no SlotCache for this model.
        self._mask_kind = mask_kind(model.config)
        # Whether this model's sequences decode over the SlotCache (learned from the first prefill):
        # only then are prompts arriving together prefilled together, and prompts prefilled in chunks.
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
        return len(self._admitting) + sum(len(b.rows) for b in self._batches())

    def _batches(self) -> list[SlotBatch | KVBatch]:
        return ([self._slots] if self._slots is not None else []) + self._singles

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
        for sequence in [*self._waiting, *self._admitting, *(row for b in self._batches() for row in b.rows)]:
            sequence.fail(unloaded)
        self._waiting.clear()
        self._admitting.clear()
        self._prefills.clear()
        self._slots, self._singles = None, []

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while (
                        not self._closed
                        and not self._waiting
                        and not self._admitting
                        and not self._batches()
                        and not self._chores
                    ):
                        self._wake.wait()
                    if self._closed:
                        return
                    chores = list(self._chores)
                    self._chores.clear()
                    room = self._max_batch_size - self.batch_size()
                    taken = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                    self._admitting += taken
                for work, done in chores:
                    try:
                        done.set_result(work())
                    except BaseException as exc:
                        done.set_exception(exc)
                try:
                    self._turn(taken)
                except Exception as exc:  # a fault of the loop's own: end its requests rather than hang them
                    self._fail_all(exc)

    def _turn(self, taken: list[Sequence]) -> None:
        """One turn of the loop: the new sequences' prefills queued, one prefill chunk, one decode step."""
        self._start_prefills(taken)
        self._prefill_chunk()
        self._drop_cancelled()
        for batch in self._batches():
            step = partial(batch.step, self._model, **self._adapter_names(batch.rows))
            self._guarded(step, batch.rows)
        if self._slots is not None and not self._slots.rows:
            self._slots = None  # its buffers go back; the next join allocates what it needs
        self._singles = [b for b in self._singles if b.rows]

    def _fail_all(self, exc: Exception) -> None:
        rows = dict.fromkeys([*self._admitting, *(row for b in self._batches() for row in b.rows)])
        self._admitting.clear()
        self._prefills.clear()
        self._slots, self._singles = None, []
        for row in rows:
            row.fail(exc)

    def _guarded(self, work: Callable[[], None], rows: list[Sequence]) -> None:
        """A failure (out of memory, a bad grammar) ends the sequences involved, not the loop."""
        try:
            work()
        except Exception as exc:
            for batch in self._batches():
                if set(batch.rows) & set(rows):
                    batch.rows = []
            for row in rows:
                row.fail(exc)

    def _start_prefills(self, taken: list[Sequence]) -> None:
        """Queue prefills for sequences just taken: images prefill whole and alone now; text prompts
        arriving together share one chunked prefill once the model's sequences are known to decode
        over the SlotCache (the first one learns it alone)."""
        images = [s for s in taken if s.model_inputs]
        text = [s for s in taken if not s.model_inputs]  # before the image prefills take their inputs
        for sequence in images:
            self._admit_image(sequence)
        if len(text) > 1 and self._mergeable:
            self._prefills.append(Prefill(text, self._model.device))
        else:
            self._prefills.extend(Prefill([s], self._model.device) for s in text)

    def _prefill_chunk(self) -> None:
        """One chunk of the oldest pending prefill; once its prompts are done, their first tokens and
        their join to a batch. A failed shared prefill is retried one prompt at a time, so one bad
        request cannot fail the others; a failed single one ends that request. A model whose
        sequences keep a cache each (sliding windows) prefills whole."""
        while self._prefills:
            job = self._prefills[0]
            for sequence in [s for s in job.rows if s.cancelled.is_set()]:
                sequence.cancel_now()
                job.rows.remove(sequence)
                self._admitting.remove(sequence)
            if job.rows:
                break
            self._prefills.popleft()
        else:
            return
        chunk = PREFILL_CHUNK if self._mergeable else None
        try:
            logits = job.advance(self._model, chunk, {**self._last_logits, **self._adapter_names(job.rows)})
        except Exception as exc:
            self._prefills.popleft()
            if len(job.rows) > 1:
                self._prefills.extendleft(Prefill([s], self._model.device) for s in reversed(job.rows))
            else:
                self._admitting.remove(job.rows[0])
                job.rows[0].fail(exc)
            return
        if logits is None:
            return
        self._prefills.popleft()
        self._fits_slots(job.cache)
        for i, row in enumerate(job.rows):
            if row.cancelled.is_set():
                row.cancel_now()
            elif not _advance_or_fail(row, logits[i]):
                self._guarded(partial(self._join, row, job.cache, i, len(row.prompt_ids)), [row])
            self._admitting.remove(row)  # only now: until joined, the row counts in batch_size()

    def _admit_image(self, sequence: Sequence) -> None:
        """Prefill a prompt with images whole and alone (its pixel inputs go with the first pass)."""
        try:
            if sequence.cancelled.is_set():
                sequence.cancel_now()
                return
            ids = torch.tensor([sequence.prompt_ids], device=self._model.device)
            images = self._prefill_inputs(sequence)
            out = self._model(
                input_ids=ids, use_cache=True, **self._last_logits, **images, **self._adapter_names([sequence])
            )
            if sequence.advance(out.logits[0, -1]):
                return
            cache = out.past_key_values
            length = cache.layers[0].keys.shape[2] if self._fits_slots(cache) else len(sequence.prompt_ids)
            # Multi-axis rotary models (Qwen2-VL) place the tokens after an image by an offset.
            self._join(sequence, cache, 0, length, _rope_delta(self._model))
        except Exception as exc:
            sequence.fail(exc)
        finally:
            self._admitting.remove(sequence)

    def _fits_slots(self, cache: Any) -> bool:
        """Whether a prefill's sequences decode over the SlotCache; the first answer is remembered."""
        self._mergeable = self._mask_kind is not None and SlotBatch.fits(cache)
        return self._mergeable

    def _join(self, row: Sequence, cache: Any, source_row: int, length: int, offset: int = 0) -> None:
        """A prefilled sequence joins the shared SlotBatch, or decodes over its own cache."""
        if self._fits_slots(cache):
            if self._slots is None:
                self._slots = SlotBatch(cache, self._mask_kind == "boolean")
            self._slots.add(row, cache, source_row, length, offset)
            return
        single = KVBatch(row, cache)  # one row only: Prefill batches rows only when they are mergeable
        single.positions += offset
        self._singles.append(single)

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
        for batch in self._batches():
            gone = [i for i, row in enumerate(batch.rows) if row.cancelled.is_set()]
            for i in gone:
                batch.rows[i].cancel_now()
            if gone:
                batch.keep([i for i in range(len(batch.rows)) if i not in gone])
