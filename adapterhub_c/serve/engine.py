"""Generation: one engine thread owns the model; requests that arrive together form a batch.

Batching (what we chose): iteration-level *cohorts*. The engine thread takes every
pending sequence (up to ``max_batch`` running at once), waiting ``window_s`` after the
first arrival for others, and runs them as one cohort: rows sorted by adapter, one
left-padded prefill, then one forward per generated token with a KV cache, all adapters
of the cohort in the same forward (``layers.MultiAdapterLinear`` applies each row's
adapter). Finished or cancelled rows leave the cohort at once (their cache rows are
dropped). Sequences that arrive while cohorts run start a new cohort at the next step
(no waiting for the running ones to end); the engine steps every cohort in turn. Soft
prompts are prepended to a row's input embeddings at prefill, so a cohort can mix rows
with and without prompts. This is not continuous batching in one KV cache (cohorts are
not merged), but no request waits for an unrelated one to finish.

A row's failure is its own request's: a sampling or decoding error ends that request only,
and a prefill that fails for a cohort of several rows is run again row by row, so the rows
that can run do (a failing forward in a later step still fails its cohort).

Greedy decoding (``temperature`` 0, or below :data:`GREEDY_BELOW`) picks ``argmax`` of the last position's logits, as
``evals.metrics.greedy_generate`` (``adapt generate``) does, stops at EOS and decodes
the whole token list each time; sampling uses a per-request ``torch.Generator`` seeded
with ``seed``, temperature then nucleus (``top_p``) filtering.
"""
from __future__ import annotations

import inspect
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from adapterhub_c.serve.errors import APIError, bad_request, from_exception
from adapterhub_c.serve.layers import GATHER_MIN, AdapterWeights, BatchContext, PromptWeights, Router
from adapterhub_c.serve.metrics import Metrics

# Below this a temperature is greedy decoding (as vLLM's _SAMPLING_EPS): logits / 1e-300 overflow
# to inf and the softmax to NaN, while the limit of sampling as T → 0 is the argmax anyway.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)


class Job:
    """One sequence to generate; events go to ``emit`` (called from the engine thread).

    Events: ``("delta", text)`` as text becomes final, ``("done", finish_reason)``,
    ``("error", APIError)``.
    """

    def __init__(self, ids: list[int], params: SamplingParams, adapter: AdapterWeights | None,
                 prompt: PromptWeights | None, emit: Callable[[tuple], None]):
        self.ids, self.params, self.adapter, self.prompt, self.emit = ids, params, adapter, prompt, emit
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_s: float | None = None
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(int(seed) % (2 ** 63))

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def sort_key(self) -> str:
        return self.adapter.key if self.adapter is not None else ""


def _hold_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still become part of a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token: argmax when temperature is 0 (or below :data:`GREEDY_BELOW`), else
    temperature + top-p sampling."""
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class Cohort:
    """Sequences generated together: one KV cache, rows sorted by adapter."""

    def __init__(self, jobs: list[Job], gather_min: int):
        self.gather_min = gather_min
        self.jobs = sorted(jobs, key=lambda j: j.sort_key)
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.context = BatchContext([j.adapter for j in self.jobs], gather_min)


class Engine:
    """The engine thread: take pending jobs, form cohorts, step them until done."""

    def __init__(self, model, tokenizer, router: Router, metrics: Metrics, max_batch: int = 64,
                 window_s: float = 0.005, device: torch.device | str = "cpu", gather_min: int = GATHER_MIN):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model, self.tokenizer, self.router, self.metrics = model, tokenizer, router, metrics
        self.max_batch, self.window_s, self.gather_min = max_batch, window_s, gather_min
        self.device = torch.device(device)
        self.eos = tokenizer.eos_token_id
        self._pending: deque[Job] = deque()
        self._cohorts: list[Cohort] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="adapt-serve-engine", daemon=True)
        self.forward_lock = threading.Lock()  # held during forwards (benchmarks time around it)
        # transformers 5 renamed past_key_values to cache
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    # ---- public ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._cond:
            self._pending.append(job)
            self.metrics.set("pending_sequences", len(self._pending))
            self._cond.notify_all()

    @property
    def active(self) -> int:
        return sum(len(c.jobs) for c in self._cohorts)

    # ---- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                jobs = self._take()
                if jobs is None:
                    return
                if jobs:
                    self._start_cohort(jobs)
                for cohort in list(self._cohorts):
                    try:
                        self._step(cohort)
                    except Exception as e:  # noqa: BLE001 - the cohort fails, the engine keeps serving
                        self._fail(cohort, e)
                self._cohorts = [c for c in self._cohorts if c.jobs]
                self.metrics.set("active_sequences", self.active)

    def _take(self) -> list[Job] | None:
        """Jobs for a new cohort (maybe none); None when stopping."""
        with self._cond:
            while not self._stop and not self._pending and not self._cohorts:
                self._cond.wait(timeout=0.5)
            if self._stop:
                return None
            if not self._pending:
                return []
            # gather the ones that arrive together: wait out the window after the oldest
            wait = self._pending[0].submitted + self.window_s - time.perf_counter()
            if wait > 0 and not self._cohorts:
                self._cond.wait(timeout=wait)
            elif wait > 0:
                return []  # the running cohorts step meanwhile
            free = self.max_batch - self.active
            jobs = []
            while self._pending and len(jobs) < free:
                job = self._pending.popleft()
                if job.cancelled.is_set():
                    self.metrics.inc("cancelled_total")
                    continue
                jobs.append(job)
            self.metrics.set("pending_sequences", len(self._pending))
            return jobs

    # ---- cohorts -----------------------------------------------------------------------
    def _forward(self, cohort: Cohort, **inputs):
        self.router.context = cohort.context
        try:
            with self.forward_lock:
                out = self.model(**inputs, **{self._cache_arg: cohort.cache}, use_cache=True, logits_to_keep=1)
        finally:
            self.router.context = None
        self.metrics.inc("forward_passes_total")
        cohort.cache = out.cache if self._cache_arg == "cache" else out.past_key_values
        cohort.logits = out.logits[:, -1]

    def _start_cohort(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` as one cohort; when that fails for several rows, each row on its own."""
        for job in [j for j in jobs if not j.ids and j.prompt is None]:
            job.emit(("error", bad_request("the prompt has no tokens", "prompt")))
        jobs = [j for j in jobs if j.ids or j.prompt is not None]
        if not jobs:
            return
        cohort = Cohort(jobs, self.gather_min)
        self.metrics.inc("batches_total")
        self.metrics.inc("batch_rows_total", len(jobs))
        self.metrics.inc("batch_adapters_total", cohort.context.distinct)
        try:
            self._prefill(cohort)
        except Exception as e:  # noqa: BLE001 - isolate the row(s) that fail: the others still run
            if len(cohort.jobs) == 1:
                self._fail(cohort, e)
                return
            for job in cohort.jobs:
                self._start_cohort([job])
            return
        self._cohorts.append(cohort)

    def _prefill(self, cohort: Cohort) -> None:
        """One left-padded forward over the cohort's prompts (soft prompts prepended)."""
        from transformers import DynamicCache

        embed = self.model.get_input_embeddings()
        rows = []
        for job in cohort.jobs:
            e = embed(torch.tensor(job.ids, dtype=torch.long, device=self.device))
            if job.prompt is not None:
                e = torch.cat([job.prompt.embeddings.to(e.dtype), e], 0)
            rows.append(e)
        length = max(r.shape[0] for r in rows)
        inputs = torch.zeros(len(rows), length, rows[0].shape[1], dtype=rows[0].dtype, device=self.device)
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            inputs[i, length - r.shape[0]:] = r
            mask[i, length - r.shape[0]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cohort.cache = DynamicCache()
        cohort.mask = mask
        cohort.positions = positions[:, -1]
        self._forward(cohort, inputs_embeds=inputs, attention_mask=mask, position_ids=positions)

    def _fail(self, cohort: Cohort, e: BaseException) -> None:
        err = from_exception(e)
        for job in cohort.jobs:
            job.emit(("error", err))
        cohort.jobs = []

    def _advance(self, job: Job, token: int) -> bool:
        """Add ``token`` to ``job``; emit what became final. True when the job is finished."""
        p = job.params
        if token == self.eos and not p.ignore_eos:
            job.finish_reason = "stop"
        else:
            job.tokens.append(token)
            if job.first_token_s is None:
                job.first_token_s = time.perf_counter() - job.submitted
            job.text = self.tokenizer.decode(job.tokens)
            for s in p.stop:
                i = job.text.find(s)
                if i >= 0:
                    job.text = job.text[:i]
                    job.finish_reason = "stop"
            if job.finish_reason is None and len(job.tokens) >= p.max_tokens:
                job.finish_reason = "length"
        if job.finish_reason is None:
            final = len(job.text) - _hold_back(job.text, p.stop)
            while final > job.sent and job.text[final - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                final -= 1
        else:
            final = len(job.text)
        if final > job.sent:
            job.emit(("delta", job.text[job.sent:final]))
            job.sent = final
        if job.finish_reason is not None:
            job.emit(("done", job.finish_reason))
            return True
        return False

    def _step(self, cohort: Cohort) -> None:
        logits = cohort.logits
        keep, tokens = [], []
        greedy = logits.argmax(-1).tolist()
        for i, job in enumerate(cohort.jobs):
            if job.cancelled.is_set():
                self.metrics.inc("cancelled_total")
                continue
            try:
                token = greedy[i] if job.params.temperature < GREEDY_BELOW else choose(logits[i], job.params,
                                                                                        job.generator)
                done = self._advance(job, token)
            except Exception as e:  # noqa: BLE001 - a sampling or decoding failure ends this request only
                job.emit(("error", from_exception(e)))
                continue
            self.metrics.inc("completion_tokens_total", 0 if token == self.eos and not job.params.ignore_eos else 1)
            if not done:
                keep.append(i)
                tokens.append(token)
        if not keep:
            cohort.jobs = []
            return
        if len(keep) < len(cohort.jobs):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            cohort.cache.batch_select_indices(index)
            cohort.mask = cohort.mask.index_select(0, index)
            cohort.positions = cohort.positions.index_select(0, index)
            cohort.jobs = [cohort.jobs[i] for i in keep]
            cohort.context = BatchContext([j.adapter for j in cohort.jobs], self.gather_min)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        cohort.mask = torch.cat([cohort.mask, torch.ones_like(cohort.mask[:, :1])], 1)
        cohort.positions = cohort.positions + 1
        try:
            self._forward(cohort, input_ids=ids, attention_mask=cohort.mask, position_ids=cohort.positions[:, None])
        except Exception as e:  # noqa: BLE001
            self._fail(cohort, e)


__all__ = ["Engine", "Job", "SamplingParams", "choose", "APIError", "GREEDY_BELOW"]
