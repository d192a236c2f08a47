"""The Engine: continuous batching where every row carries its own Route.

A scheduler step admits waiting requests (FIFO, bounded by `max_batch` rows and
`max_tokens_in_flight`), prefills them together, then runs one decode step for every
running row; finished rows leave at once and their KV rows are compacted away. The base
projections run once per batch; each row adds the LoRA delta of its own route's slot.

Callers either drive it synchronously (`generate`, used by the CLI and eval) or start the
background loop (`start`, used by the server) and `submit` from any thread; tokens stream
through each request's queue.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..adapter import Adapter
from ..base import Base
from ..errors import EngineError, LorastackError, NotFoundError
from ..route import Route
from .gguf_blocks import read_blocks
from .lora import LoraBank, LoraBatch
from .prefix import PrefixCache
from .llama import LlamaRunner, supports
from .constrain import Grammars, RowGrammar, mask_logits
from .pieces import Pieces
from .sampling import Generation, Messages, Sampling, TokenLogprob, pick_tokens, token_logprobs
from .speculative import PromptLookup

_ids = itertools.count(1)
# Draft tokens per greedy row and step (prompt-lookup speculative decoding), and the most
# tokens one verify pass may carry; see bench/engine.py's prompt-lookup rows. Each row's draft
# length adapts (Hugging Face's assisted-generation rule): +2 after a fully accepted draft, -1
# otherwise, from SPECULATE_START. Why: a verify pass of 2 tokens costs about one decode step
# but one of 8 nearly two (the block GEMV is compute-bound), so rows whose drafts keep failing
# must draft little (measured: a fixed 7 lost 3% on json_field, gained 14% on reverse_words).
SPECULATE = 7
SPECULATE_START = 3
SPECULATE_TOKENS = 8
# A row does not stop drafting after rejected drafts: a row that copies its input often departs
# from it for a few tokens and then copies again, where a 3-gram match drafts well. An earlier
# per-row backoff (no drafts for 8-64 tokens after two drafts rejected outright) lost more there
# than it saved (A/B with a scratch harness of bench/engine.py's prompt-lookup rows, decode only:
# copy 1.82-1.88x without it vs 1.66-1.74x with it, date_format 1.17-1.24x vs 1.11-1.14x, json_field
# and reverse_words equal); tasks whose drafts fail are caught by the per-route record below.
# Across requests, per route (adapter or mixture): once a route's drafts have yielded fewer than
# SPECULATE_MIN_YIELD accepted tokens per drafted one over at least SPECULATE_EVIDENCE drafted
# tokens, its new requests do not draft, except every SPECULATE_PROBE-th, which keeps the
# evidence fresh. Why: answers are often a handful of tokens, too short for one request to
# show whether drafting pays, and a route whose answers are not copies (reverse_words: 2 of 42
# drafted tokens accepted) paid for its drafts on every request (0.84x decode speed, measured
# with bench/engine.py --lookup-only). The history decays (halved past SPECULATE_HISTORY drafted
# tokens), so a route whose inputs change is judged on what it does now.
SPECULATE_MIN_YIELD = 0.15
SPECULATE_EVIDENCE = 24
SPECULATE_PROBE = 8
SPECULATE_HISTORY = 256
log = logging.getLogger("lorastack.engine")


@dataclass(eq=False)
class Request:
    """One generation in flight; `stream()` yields text pieces, `result()` waits for the end."""

    prompt_ids: list[int]
    route: Route
    sampling: Sampling
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    # Optional early exit: called with the text so far; True ends the request ("abandoned").
    # Evaluation uses it to stop a row once it can no longer match the reference exactly.
    abandon_when: Callable[[str], bool] | None = None
    # Optional push listener, called on the engine thread with each text piece and a final
    # None; the server uses it to hand pieces to its event loop without a polling thread.
    on_event: Callable[[str | None], None] | None = None
    # For routed (`auto`) requests: decides again if the chosen adapter vanished before loading.
    reroute: Callable[[], Route] | None = None
    # With `sampling.logprobs` set: one entry per generated token, plus the end-of-sequence
    # token's when that is what ended the request (scorers such as lm-eval count on it).
    logprobs: list[TokenLogprob] = field(default_factory=list)
    _emitted: int = 0
    _slots: tuple = ()  # ((slot, weight), ...) in the LoRA bank
    _rng: torch.Generator | None = None
    _grammar: RowGrammar | None = None  # structured output: this row's grammar state
    _lookup: PromptLookup | None = None  # speculative drafts (greedy rows only)
    _looked: int = 0  # how many of `tokens` the lookup index has seen
    _draft_len: int = 0  # this row's current draft length (adaptive; 0 = not started)
    _no_drafts: bool = False  # its route's drafts have not paid (see _route_drafts)
    _spec_key: str = ""  # the route its drafts are counted under (Engine._spec_yield)
    _pieces: Pieces = field(init=False, repr=False)  # the answer's text pieces, to stream() and on_event

    def __post_init__(self) -> None:
        self._pieces = Pieces(self.on_event)

    @property
    def done(self) -> bool:
        return self._pieces.done

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has finished (or `timeout` passes); True if it has."""
        return self._pieces.wait(timeout)

    def cancel(self) -> None:
        """Stop generating (a disconnected client); the row is freed at the next step."""
        self.cancelled = True

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        return self._pieces.stream(lambda: self.error, timeout)

    def result(self, timeout: float | None = None) -> Generation:
        if not self._pieces.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout}s")
        if self.error:
            raise self.error
        return Generation(self.text, len(self.prompt_ids), len(self.tokens), self.finish_reason or "stop")


class Engine:
    def __init__(
        self,
        base: Base,
        resolve: Callable[[str], Adapter] | None = None,
        max_batch: int = 32,
        max_tokens_in_flight: int = 32768,
        max_resident: int = 16,
        max_prefill_tokens: int = 4096,
        prefix_cache: int = 64,
        int8_rows: int = 0,
        native: bool = True,
        speculate: int = SPECULATE,
        gguf_blocks: bool = True,
        int8_matmuls: bool = False,
    ) -> None:
        """`int8_rows` > 0 decodes batches of at most that many rows with int8 weight-only
        matmuls (bf16 bases only): ~1.8x faster batch-1 decode than torch's bf16 path (bench/engine.py
        rows i vs j), about equal to the compiled kernels, slightly different rounding.
        `native` uses the compiled bf16 decode kernels (engine/native.py) where they build.
        `speculate` > 0 lets greedy rows verify up to that many prompt-lookup draft tokens per
        decode step (engine/speculative.py; outputs unchanged, fewer forward passes).
        `gguf_blocks` decodes a GGUF base from its Q4_1/Q8_0 blocks with the compiled kernels
        (engine/gguf_blocks.py; same output as its bf16 weights, fewer bytes a token).
        `int8_matmuls` multiplies every layer projection, the LM head and the LoRA deltas in int8
        with the compiled kernels (LlamaRunner, LoraBank): faster at every batch size, outputs
        slightly different from the exact path (README, "--int8")."""
        for option, value in (("max_batch", max_batch), ("max_resident", max_resident),
                              ("max_tokens_in_flight", max_tokens_in_flight), ("max_prefill_tokens", max_prefill_tokens)):
            if value < 1:  # a batch of 0 rows would queue every request forever
                raise LorastackError(f"{option} must be >= 1, got {value}")
        if not supports(base.model):
            raise LorastackError(f"the engine supports Llama-family bases, not {getattr(base.model.config, 'model_type', '?')}")
        self.base = base
        self.resolve = resolve or (lambda name: (_ for _ in ()).throw(LorastackError(f"adapter {name!r}: no library attached")))
        self.max_batch = max_batch
        self.max_tokens_in_flight = max_tokens_in_flight
        self.max_prefill_tokens = max_prefill_tokens
        # Prefill is compute-bound and far more efficient in bulk (measured: ~500 tok/s for
        # one prompt, ~1200 for 32), so while rows are decoding, new ones are admitted in
        # groups of at least this many; an idle engine admits at once (latency unchanged).
        self.min_admit = max(1, max_batch // 8)
        blocks = None
        if gguf_blocks and native and base.gguf is not None and base.dtype == torch.bfloat16:
            cfg = base.model.config
            try:
                blocks = read_blocks(base.gguf, cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
            except Exception as e:  # noqa: BLE001 - an unreadable file only costs speed
                log.warning("cannot read GGUF blocks of %s, decoding from bf16: %s", base.gguf, e)
        self.runner = LlamaRunner(base.model, int8_rows=int8_rows, native=native, blocks=blocks, int8_matmuls=int8_matmuls)
        self.bank = LoraBank(self.runner.groups, base.dtype, self.resolve, max_resident=max_resident, native=self.runner.native,
                             int8=bool(self.runner.i8))
        self.runner.bank = self.bank
        self.cache = self.runner.new_cache()
        self.speculate = max(0, speculate)
        if self.speculate and base.dtype == torch.bfloat16 and not self.runner.attention_kernel:
            # bf16 through torch alone (no compiled kernels, or LORASTACK_NATIVE=0): a verify pass
            # of several tokens and a one-token step pick different GEMM/attention blockings and
            # round differently, so drafts could change greedy outputs (measured on the embedded
            # base); speculation is exact only on the batch-invariant kernels.
            log.info("speculative decoding off: bf16 without the compiled kernels is not batch-invariant")
            self.speculate = 0
        self.prefixes = PrefixCache(max_entries=prefix_cache) if prefix_cache else None
        self.running: list[Request] = []
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()  # see run_between_steps
        self._stop = False
        self.failure: BaseException | None = None  # what ended the last loop thread, if anything did
        self._grammars: Grammars | None = None  # built at the first constrained request
        self._grammars_lock = threading.Lock()
        self._spec_yield: dict[str, tuple[int, float, int]] = {}  # route -> (drafted, accepted, requests skipped)
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "requests": 0, "batch_rows_sum": 0,
                      "failed_steps": 0, "failed_rows": 0, "restarts": 0, "drafted": 0, "accepted": 0}

    # ------------------------------------------------------------ submitting
    def submit(self, prompt: str | Messages, route: Route, sampling: Sampling = Sampling(),
               abandon_when: Callable[[str], bool] | None = None,
               on_event: Callable[[str | None], None] | None = None,
               reroute: Callable[[], Route] | None = None) -> Request:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = self.base.chat_ids(messages)
        return self.submit_ids(ids, route, sampling, abandon_when, on_event, reroute)

    def submit_ids(self, ids: list[int], route: Route, sampling: Sampling = Sampling(),
                   abandon_when: Callable[[str], bool] | None = None,
                   on_event: Callable[[str | None], None] | None = None,
                   reroute: Callable[[], Route] | None = None) -> Request:
        if not ids:
            raise LorastackError("empty prompt")
        room = self.base.answer_room(len(ids))
        if sampling.max_tokens > room:
            # Positions past the base's context were never trained: the answer stops there
            # (finish_reason "length"), as it would at max_tokens. Callers that must refuse
            # instead (the server, `generate`) check before submitting.
            sampling = dataclasses.replace(sampling, max_tokens=room)
        if len(ids) + sampling.max_tokens > self.max_tokens_in_flight:
            raise LorastackError(
                f"prompt ({len(ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds the engine's limit of {self.max_tokens_in_flight}"
            )
        req = Request(ids, route, sampling, abandon_when=abandon_when, on_event=on_event, reroute=reroute)
        if sampling.constraint is not None:
            req._grammar = self.grammars().matcher(sampling.constraint)
        if sampling.temperature > 0:
            req._rng = torch.Generator()
            req._rng.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(0, 2**62, ())))
        with self._wake:
            self.waiting.append(req)
            self._wake.notify()
        return req

    def generate(self, conversations: list[Messages], routes: Route | list[Route], sampling: Sampling = Sampling(),
                 on_done: Callable[[int], None] | None = None) -> list[Generation]:
        """Generate one reply per conversation; each may have its own route. Blocks until done."""
        routes = routes if isinstance(routes, list) else [routes] * len(conversations)
        reqs = [self.submit(c, r, sampling) for c, r in zip(conversations, routes)]
        if self._thread is None:
            pending = set(reqs)
            while pending:
                self.step()
                finished = {r for r in pending if r.done}
                if finished and on_done:
                    on_done(len(finished))
                pending -= finished
        return [r.result() for r in reqs]

    def grammars(self) -> Grammars:
        """The structured-output compiler for this base's tokenizer (built once, on first use)."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.base.tokenizer, self.base.model.config.vocab_size, self.base.eos_token_id)
            return self._grammars

    def forget(self, adapter: str) -> None:
        """Drop everything cached for `adapter` (it was replaced or removed in the library)."""
        with self._lock:
            self.bank.forget(adapter)
            if self.prefixes is not None:
                self.prefixes.forget(adapter)

    def run_between_steps(self, job: Callable[[], object]) -> Future:
        """Run `job` on the engine's own thread between two steps (at once when no loop runs).

        For work that shares the LoRA bank with generation, such as scoring a prompt's tokens
        under a route (`score.prompt_logprobs`) while the server keeps decoding: on the loop's
        thread it cannot race a step for adapter slots."""
        fut: Future = Future()
        if self._thread is None:
            _run_job(job, fut)
            return fut
        with self._wake:
            self._jobs.append((job, fut))
            self._wake.notify()
        return fut

    def _run_jobs(self) -> None:
        while self._jobs:
            with self._lock:
                job, fut = self._jobs.popleft()
            _run_job(job, fut)

    # ------------------------------------------------------------ background loop
    def start(self) -> None:
        """Start the background loop; also restarts one that died (see `_loop`)."""
        if self._thread is not None and not self._thread.is_alive():
            self._thread = None
            self.stats["restarts"] += 1
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="lorastack-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._wake:
                self._stop = True
                self._wake.notify()
            self._thread.join()
            self._thread = None
        while self._jobs:  # nobody will run them now
            self._jobs.popleft()[1].set_exception(EngineError("the engine stopped before this job ran"))

    @property
    def alive(self) -> bool:
        """Whether the background loop is running (health checks report this)."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        """`step` isolates faults per row and per step; anything that still escapes it is
        recorded in `failure`, fails every queued request (no client waits forever) and
        ends the thread, which `alive` then reports and `start` replaces."""
        try:
            while True:
                with self._wake:
                    while not self._stop and not self.waiting and not self.running and not self._jobs:
                        self._wake.wait()
                    if self._stop:
                        return
                self.step()
        except BaseException as e:  # noqa: BLE001 - recorded, reported and recovered from
            log.exception("engine loop died")
            self.failure = e
            self._fail_all(EngineError(f"the engine stopped ({type(e).__name__}: {e}); retry the request"))

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------ scheduling
    def step(self) -> None:
        """Admit and prefill what fits, then decode one token for every running row."""
        self._run_jobs()
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self.running:
            try:
                self._decode()
            except Exception as e:  # noqa: BLE001 - a failed step fails its rows, not the engine
                self._fail_step(list(self.running), "decode", e)
        elif not self.waiting:
            self.cache.trim()

    def _fail_step(self, reqs: list[Request], stage: str, e: Exception) -> None:
        log.exception("engine %s step failed for %d request(s)", stage, len(reqs))
        self.stats["failed_steps"] += 1
        for req in reqs:
            req.error = req.error or EngineError(f"request failed in the engine's {stage} step ({type(e).__name__}: {e})")
            req.finish_reason = "error"
            self._retire(req)

    def _fail_all(self, error: LorastackError) -> None:
        """Fail every running and waiting request (the loop is going away)."""
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
            jobs, self._jobs = list(self._jobs), deque()
        for _, fut in jobs:
            fut.set_exception(error)
        for req in list(self.running):
            req.error = req.error or error
            req.finish_reason = "error"
            try:
                self._retire(req)
            except Exception:  # noqa: BLE001 - the state is already broken; the client must still hear
                self._finish(req, "error")
        for req in waiting:
            req.error = error
            self._finish(req, "error")

    def _in_flight(self) -> int:
        return sum(len(r.prompt_ids) + r.sampling.max_tokens for r in self.running)

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        budget = self.max_tokens_in_flight - self._in_flight()
        prefill = 0
        free = self.max_batch - len(self.running)
        if self.running and free < self.min_admit and len(self.waiting) >= free:
            return admitted  # let a few more rows finish, then prefill them together
        with self._lock:
            while self.waiting and len(self.running) + len(admitted) < self.max_batch:
                req = self.waiting[0]
                if req.cancelled:
                    self.waiting.popleft()
                    self._finish(req, "cancelled")
                    continue
                need = len(req.prompt_ids) + req.sampling.max_tokens
                if need > budget or (admitted and prefill + len(req.prompt_ids) > self.max_prefill_tokens):
                    break
                try:
                    req._slots = self.bank.slots_for(req.route)
                except LorastackError as e:
                    if "slots are in use" in str(e) and (self.running or admitted):
                        break  # wait for running rows to release a slot
                    if isinstance(e, NotFoundError) and req.reroute is not None:
                        # A router chose an adapter that was removed before it loaded: ask again, once.
                        reroute, req.reroute = req.reroute, None
                        try:
                            req.route = reroute()
                            continue
                        except Exception as again:  # noqa: BLE001 - fall through to failing the request
                            e = again if isinstance(again, LorastackError) else e
                    self.waiting.popleft()
                    req.error = e
                    self._finish(req, "error")
                    continue
                except Exception as e:  # noqa: BLE001 - a broken adapter fails its request, not the engine
                    self.waiting.popleft()
                    req.error = LorastackError(f"cannot load route {req.route}: {e}")
                    self._finish(req, "error")
                    continue
                self.bank.pin(req._slots)
                self.waiting.popleft()
                admitted.append(req)
                budget -= need
                prefill += len(req.prompt_ids)
        return admitted

    def _lora(self, reqs: list[Request]) -> LoraBatch:
        return LoraBatch(self.bank, [r._slots for r in reqs])

    def _prefill(self, reqs: list[Request]) -> None:
        """Prefill `reqs` together; if that fails, they fail (their new cache rows are
        dropped and their adapter slots released) and the rows already decoding go on."""
        n_before = self.cache.n
        try:
            logits = self._prefill_rows(reqs)
        except Exception as e:  # noqa: BLE001
            self.running = [r for r in self.running if r not in set(reqs)]
            self.cache.truncate(n_before)
            log.exception("engine prefill failed for %d request(s)", len(reqs))
            self.stats["failed_steps"] += 1
            for req in reqs:
                self.bank.unpin(req._slots)
                req.error = req.error or EngineError(f"request failed in the engine's prefill step ({type(e).__name__}: {e})")
                self._finish(req, "error")
            return
        self.stats["prefills"] += 1
        self._emit(reqs, logits, list(range(n_before, n_before + len(reqs))))

    def _prefill_rows(self, reqs: list[Request]) -> torch.Tensor:
        """Cache rows, prefix-cache hits and one packed prefill; returns each row's last logits."""
        reqs.sort(key=lambda r: r._slots)  # contiguous LoRA segments (see LoraBatch)
        prompts = [r.prompt_ids for r in reqs]
        hits = [self.prefixes.lookup(str(r.route), r.prompt_ids) if self.prefixes else (None, 0) for r in reqs]
        starts = [n for _, n in hits]
        first = self.cache.add_rows(len(reqs), max(len(p) + r.sampling.max_tokens for p, r in zip(prompts, reqs)))
        for i, (entry, n) in enumerate(hits):
            if entry is not None:
                for li in range(len(self.cache.k)):
                    self.cache.k[li][first + i, :, :n] = entry.k[li][:, :n]
                    self.cache.v[li][first + i, :, :n] = entry.v[li][:, :n]
        logits = self.runner.prefill(self.cache, first, prompts, LoraBatch(self.bank, [r._slots for r in reqs], [len(p) - s for p, s in zip(prompts, starts)]), starts)
        if self.prefixes is not None:
            for i, r in enumerate(reqs):
                ln = min(len(r.prompt_ids), self.prefixes.max_entry_tokens)
                self.prefixes.store(str(r.route), r.prompt_ids[:ln],
                                    [k[first + i, :, :ln].clone() for k in self.cache.k],
                                    [v[first + i, :, :ln].clone() for v in self.cache.v])
        self.running.extend(reqs)
        return logits

    def _decode(self) -> None:
        drafts = self._drafts() if self.speculate else None
        if drafts is not None and any(drafts):
            self._decode_speculative(drafts)
            return
        need = max(int(self.cache.lengths[i]) + 1 for i in range(self.cache.n))
        self.cache.reserve(self.cache.n, need)
        tokens = torch.tensor([r.tokens[-1] for r in self.running], dtype=torch.long)
        logits = self.runner.decode(self.cache, tokens, self._lora(self.running))
        self.stats["steps"] += 1
        self.stats["batch_rows_sum"] += len(self.running)
        self._emit(list(self.running), logits, list(range(len(self.running))))

    def _drafts(self) -> list[list[int]]:
        """Each running row's prompt-lookup draft ([] for none). Only greedy rows draft (their
        accepted tokens are exactly what one-at-a-time decoding picks); the tokens of one
        verify pass are capped at `SPECULATE_TOKENS` (or the batch size), where a pass still
        costs about one decode step because the weights are streamed once for all its rows."""
        budget = max(SPECULATE_TOKENS, len(self.running)) - len(self.running)
        drafts: list[list[int]] = []
        for req in self.running:
            if budget <= 0 or not req.sampling.greedy or req.cancelled or req._no_drafts:
                drafts.append([])
                continue
            if req._lookup is None:
                req._lookup = PromptLookup(req.prompt_ids)
                req._spec_key = str(req.route)
                if not self._route_drafts(req._spec_key):
                    req._no_drafts = True
                    drafts.append([])
                    continue
            req._lookup.extend(req.tokens[req._looked :])
            req._looked = len(req.tokens)
            left = req.sampling.max_tokens - len(req.tokens) - 1  # the pass always adds one token more
            req._draft_len = req._draft_len or min(SPECULATE_START, self.speculate)
            draft = req._lookup.propose(min(req._draft_len, left, budget))
            budget -= len(draft)
            drafts.append(draft)
        return drafts

    def _route_drafts(self, key: str) -> bool:
        """Whether a new request on route `key` drafts: yes until its route's drafts have been
        shown not to pay (SPECULATE_MIN_YIELD), then only every SPECULATE_PROBE-th request."""
        drafted, accepted, skipped = self._spec_yield.get(key, (0, 0, 0))
        drafts = drafted < SPECULATE_EVIDENCE or accepted >= SPECULATE_MIN_YIELD * drafted or skipped + 1 >= SPECULATE_PROBE
        self._set_yield(key, drafted, accepted, 0 if drafts else skipped + 1)
        return drafts

    def _count_drafts(self, key: str, drafted: int, accepted: int) -> None:
        d, a, skipped = self._spec_yield.get(key, (0, 0, 0))
        d, a = d + drafted, a + accepted
        if d > SPECULATE_HISTORY:
            d, a = d // 2, a / 2
        self._set_yield(key, d, a, skipped)

    def _set_yield(self, key: str, drafted: int, accepted: float, skipped: int) -> None:
        """The one writer of `_spec_yield`, so its bound holds whichever path adds a route."""
        self._spec_yield[key] = (drafted, accepted, skipped)
        if len(self._spec_yield) > 4096:  # routes come and go; forget the oldest
            self._spec_yield.pop(next(iter(self._spec_yield)))

    def _decode_speculative(self, drafts: list[list[int]]) -> None:
        """One verify pass for every running row (rows without a draft feed one token), then
        each row keeps its longest draft prefix that its own sampling picks, plus one token.

        Accepted tokens go through `_emit` position by position, the same path as ordinary
        decoding (stop rules, streaming, per-row failures). Before that, each row's cache length
        covers every fed token, so a row that `_emit` retires meanwhile moves its K/V intact;
        afterwards each surviving row's length is cut back to its accepted tokens.
        """
        reqs = list(self.running)
        feeds = [[r.tokens[-1]] + d for r, d in zip(reqs, drafts)]
        start = [int(x) for x in self.cache.lengths[: len(reqs)]]
        logits = self.runner.decode(self.cache, feeds, LoraBatch(self.bank, [r._slots for r in reqs], [len(f) for f in feeds]))
        self.stats["steps"] += 1
        self.stats["batch_rows_sum"] += len(reqs)
        offsets = list(itertools.accumulate((len(f) for f in feeds), initial=0))
        accepted = {r: 0 for r in reqs}
        alive = list(range(len(reqs)))
        for j in range(max(len(f) for f in feeds)):
            if not alive:
                break
            self._emit([reqs[i] for i in alive], logits[[offsets[i] + j for i in alive]], list(range(len(alive))))
            still = []
            for i in alive:
                req = reqs[i]
                if req.done or req.finish_reason or j >= len(drafts[i]) or req.tokens[-1] != drafts[i][j]:
                    continue
                accepted[req] += 1
                still.append(i)
            alive = still
        self.stats["drafted"] += sum(len(d) for d in drafts)
        self.stats["accepted"] += sum(accepted.values())
        for req, draft in zip(reqs, drafts):
            if draft:
                self._count_drafts(req._spec_key, len(draft), accepted[req])
                full = accepted[req] == len(draft)
                req._draft_len = min(self.speculate, req._draft_len + 2) if full else max(1, req._draft_len - 1)
        for req, n0 in zip(reqs, start):
            if not req.done and req in self.running:
                self.cache.lengths[self.running.index(req)] = n0 + 1 + accepted[req]

    def _emit(self, reqs: list[Request], logits: torch.Tensor, rows: list[int]) -> None:
        mask_logits(logits, [r._grammar for r in reqs])  # structured-output rows: only what their grammar allows
        picks = pick_tokens(logits, [r.sampling for r in reqs], [r._rng for r in reqs])
        if any(r.sampling.logprobs is not None for r in reqs):  # the one check a step without logprobs pays
            self._record_logprobs(reqs, logits, picks)
        now = time.perf_counter()
        done: list[Request] = []
        eos = self.base.eos_token_id
        for req, tok in zip(reqs, picks):
            if req.first_token_at is None:
                req.first_token_at = now
            try:
                if isinstance(tok, Exception):
                    raise tok
                if req._grammar is not None:
                    req._grammar.accept(tok)
                if tok == eos and not req.sampling.ignore_eos:
                    req.finish_reason = "stop"
                else:
                    req.tokens.append(tok)
                    self.stats["tokens"] += 1
                    self._update_text(req)
                    if req.finish_reason is None and len(req.tokens) >= req.sampling.max_tokens:
                        req.finish_reason = "length"
            except Exception as e:  # noqa: BLE001 - this row fails alone; the batch goes on
                self.stats["failed_rows"] += 1
                req.error = e if isinstance(e, LorastackError) else EngineError(
                    f"request failed while sampling or decoding its text ({type(e).__name__}: {e})")
                req.finish_reason = "error"
            if req.finish_reason or req.cancelled:
                done.append(req)
        for req in done:
            self._retire(req)

    def _record_logprobs(self, reqs: list[Request], logits: torch.Tensor, picks: list) -> None:
        """Append each asking row's chosen token's logprob (and top alternatives), from the
        logits it was picked from, to `req.logprobs`."""
        for i, (req, tok) in enumerate(zip(reqs, picks)):
            if req.sampling.logprobs is not None and not isinstance(tok, Exception):
                req.logprobs += token_logprobs(logits[i : i + 1], [tok], req.sampling.logprobs)

    def _update_text(self, req: Request) -> None:
        tok = self.base.tokenizer
        text = tok.decode(req.tokens, skip_special_tokens=True)
        for s in req.sampling.stop:
            if s and s in text:
                text = text[: text.index(s)]
                req.finish_reason = "stop"
        req.text = text
        if req.abandon_when is not None and not req.finish_reason and req.abandon_when(text):
            req.finish_reason = "abandoned"
        # Hold back a partial UTF-8 character and anything that could still become a stop string.
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        if not req.finish_reason:
            for s in req.sampling.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        if safe > req._emitted:
            req._pieces.push(text[req._emitted : safe])
            req._emitted = safe

    def _retire(self, req: Request) -> None:
        row = self.running.index(req)
        moved = self.cache.remove_row(row)
        last = self.running.pop()
        if moved is not None:
            self.running[row] = last
        self.bank.unpin(req._slots)
        self._finish(req, req.finish_reason or ("cancelled" if req.cancelled else "stop"))

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = req.finish_reason or reason
        if req._emitted < len(req.text) and not req.error:
            req._pieces.push(req.text[req._emitted :])
            req._emitted = len(req.text)
        req.finished_at = time.perf_counter()
        self.stats["requests"] += 1
        req._pieces.close()

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.running if r.cancelled]:
            self._retire(req)


def _linears(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            yield name, m


def _run_job(job: Callable[[], object], fut: Future) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(job())
    except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
        fut.set_exception(e)
