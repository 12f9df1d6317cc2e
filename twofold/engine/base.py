"""The inference-engine interface: what the rollout needs from any engine (built-in, vLLM, ...).

Every sampled token comes back with its behaviour log-prob (log of the exact distribution it was
sampled from) and the policy version of the weights that produced it. A weight update pauses
in-flight requests at a token boundary; their partial output is handed back and continued later,
so one response can span versions.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class GenerationRequest:
    """A prompt plus what was already generated for it (non-empty when continuing a paused request)."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_versions: list[int] = field(default_factory=list)

    def unchanged(self, finish_reason: FinishReason) -> GenerationResult:
        """The output so far, handed back as is (this call generated nothing for the request)."""
        return GenerationResult(
            self.request_id,
            list(self.output_ids),
            list(self.output_logprobs),
            list(self.output_versions),
            finish_reason,
        )

    def untouched(self) -> GenerationResult:
        """The output so far, handed back by a call that generated nothing for the request: "length" when it was
        already full, else "paused" (the call stopped, or never started, for a weight update)."""
        return self.unchanged("length" if len(self.output_ids) >= self.params.max_new_tokens else "paused")


FinishReason = Literal["stop", "length", "paused"]


@dataclass
class GenerationResult:
    request_id: int
    output_ids: list[int]
    output_logprobs: list[float]
    output_versions: list[int]
    finish_reason: FinishReason

    def as_continuation(self, request: GenerationRequest) -> GenerationRequest:
        """The request to submit after a pause: same prompt, the partial output kept as prefix."""
        return GenerationRequest(
            request.request_id,
            request.prompt_ids,
            request.params,
            list(self.output_ids),
            list(self.output_logprobs),
            list(self.output_versions),
        )


# Continuous batching: `joiners(room)` hands a running batch up to `room` requests that became ready while it ran
# (an episode back from its env step); `on_result` receives each request's result as soon as it is done.
Joiners = Callable[[int], list[GenerationRequest]]
# A version's weights by Hugging Face name: a dict, or (name, tensor) pairs as they are gathered
# (`twofold.models.iter_full_weights`), which an engine must consume to the end.
Weights = Mapping[str, Any] | Iterable[tuple[str, Any]]


def weight_items(weights: Weights) -> Iterator[tuple[str, Any]]:
    return iter(weights.items() if isinstance(weights, Mapping) else weights)


OnResult = Callable[[GenerationResult], None]


def sampling_key(params: SamplingParams) -> tuple[float, float, int]:
    """What one vectorised sampler needs to be equal across a batch's rows (lengths and stops are per row)."""
    return (params.temperature, params.top_p, params.top_k)


class InferenceEngine(ABC):
    """Pause protocol shared by every engine, and the continuous-batching contract.

    `pause()` asks running `generate` calls to stop at the next token boundary and returns once none
    is running: each hands back its partial output with finish_reason "paused". Until `resume()`,
    a new `generate` call returns at once, also "paused". In between the caller may `update_weights`.
    """

    def __init__(self) -> None:
        self.version = 0
        self._cond = threading.Condition()
        self._paused = False
        self._running = 0

    # ---- the part each engine implements

    @abstractmethod
    def _generate(
        self, requests: list[GenerationRequest], joiners: Joiners | None, on_result: OnResult | None
    ) -> list[GenerationResult]:
        """Run until each request stops, hits its length, or `self.pause_requested` turns true; results of
        `requests` in order. An engine that batches continuously takes `joiners` into its running batch and
        reports every result (joined ones too) to `on_result` as it finishes; one that does not ignores both."""

    # Where `update_weights` wants the tensors: host memory unless an engine says otherwise (the built-in one
    # takes them on its own device, so a trainer beside it on a GPU never sends them through the host).
    weights_device: str = "cpu"

    @abstractmethod
    def update_weights(self, weights: Weights, version: int) -> None:
        """Load new weights in place and stamp later tokens with `version` (call while paused)."""

    # ---- the shared pause protocol

    @property
    def pause_requested(self) -> bool:
        return self._paused

    def generate(
        self,
        requests: list[GenerationRequest],
        joiners: Joiners | None = None,
        on_result: OnResult | None = None,
    ) -> list[GenerationResult]:
        """Results of `requests`, in order. With `on_result`, every result (of `requests` and of what `joiners`
        handed in) also goes to `on_result`, once, as soon as the engine has it; `joiners` needs `on_result`,
        which is the only place a joined request's result goes."""
        if joiners is not None and on_result is None:
            raise ValueError("generate: `joiners` needs `on_result`, where joined requests' results go")
        if self.asleep:  # its weights are gone (vLLM's scheduler would wait for them forever)
            raise RuntimeError("generate: the engine sleeps until `update_weights` gives it weights")
        reported: set[int] = set()

        def report(result: GenerationResult) -> None:
            reported.add(result.request_id)
            on_result(result)

        with self._cond:
            self._running += 1
        try:
            results = self._generate(requests, joiners, report if on_result is not None else None)
            for result in results if on_result is not None else ():
                if result.request_id not in reported:  # an engine that reports only at the end
                    report(result)
            return results
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            self._paused = True
            while self._running:
                self._cond.wait()

    def resume(self) -> None:
        with self._cond:
            self._paused = False

    # True between `sleep()` and the next `update_weights`
    asleep: bool = False

    def sleep(self) -> None:
        """Release the weights' memory and every cached KV until the next `update_weights`, which takes them back
        (`engine.sleep`, sync mode: called once a batch is generated, while nothing generates); a no-op when
        asleep already."""
        raise NotImplementedError(f"{type(self).__name__} cannot release its memory between steps")

    def resident_weight_bytes(self) -> int:
        """Bytes of this process's memory the engine's weights take: 0 where they live in another process (vLLM's
        engine core, a Ray replica)."""
        return 0

    def resident_cache_bytes(self) -> int:
        """Bytes of this process's memory the engine keeps across calls (the built-in engine's prefix cache)."""
        return 0

    def prefill_metrics(self) -> dict[str, int]:
        """Counters of the context the engine ran through its model and the context it reused (engine/* metrics);
        none for an engine that does not count them."""
        return {}

    def close(self) -> None:  # noqa: B027 (optional for engines: the built-in one holds nothing to release)
        """Release resources (processes, GPU memory); the built-in engine holds none."""
