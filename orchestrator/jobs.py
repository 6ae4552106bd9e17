"""A client request across its attempts (`Job`), its place among the requests waiting for their
first token (`QueueSlot`), and the output that ends it between attempts (`ended`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from orchestrator.detokenizer import IncrementalDetokenizer
from orchestrator.outputs import Output
from workers.engine.messages import SamplingParams

if TYPE_CHECKING:
    from orchestrator.router import Router


@dataclass
class Job:
    """One client request across its attempts (`Router.generate`)."""

    rid: str  # the client's
    input_ids: list[int]
    sampling: SamplingParams
    whole: bool  # the ranks may hold the output after the first token until the end
    timeout_s: float | None
    deadline: float | None  # on the loop's clock
    # One for all attempts (it holds the stop strings): the text goes on where it stood.
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)  # handed to the consumer so far
    aborted: bool = False  # by the client while it waited for a rank (`Router.abort`)


class QueueSlot:
    """A request's place in `Router.num_queued` (requests without their first token yet):
    taken at admission, given back at the request's first token or end — or, for a request
    whose outputs were never read, when the slot is dropped."""

    def __init__(self, router: Router):
        router.num_queued += 1
        self._router: Router | None = router

    def release(self) -> None:
        if self._router is not None:
            self._router.num_queued -= 1
            self._router = None

    def __del__(self) -> None:
        self.release()


def ended(job: Job, finish_reason: str, error: str | None) -> Output:
    """The last output of `job`, ended by the router between attempts."""
    return Output(
        rid=job.rid, text=job.detok.flush(), token_ids=[],
        num_prompt_tokens=len(job.input_ids), num_output_tokens=len(job.output_ids),
        finish_reason=finish_reason, error=error,
    )  # fmt: skip
